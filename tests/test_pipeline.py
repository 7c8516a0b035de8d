"""The whole path: a folder through `imgstream submit`, a worker and the pgvector sink."""

from __future__ import annotations

from tests.test_producer_cli import folder, imgstream  # noqa: F401 - fixture and CLI runner
from tests.test_sink import count, db, query, sink_configs, sink_until  # noqa: F401 - fixture and helpers
from tests.test_worker import worker  # noqa: F401 - fixture: a worker on this test's topics


async def test_folder_to_database_once_and_a_replay_adds_no_rows(broker, topics, worker, folder, db, tmp_path):
    code, out, err = await imgstream(broker, topics, "submit", str(folder), "--task", "embed_clip_vit_b_32",
                                     "--task", "detect_bounding_box:prominent_face", "--wait", "--json",
                                     "--blob-dir", str(tmp_path / "blobs"))
    assert code == 0, err
    assert len(out.splitlines()) == 6  # 3 images x 2 tasks

    kafka, sink = sink_configs(broker, topics, db)
    await sink_until(kafka, sink, lambda s: s.stats.records >= 6, timeout_s=60)
    assert count(db, "emb_embed_clip_vit_b_32") == 3
    assert count(db, "results") == 3  # the face boxes
    rows = query(db, "SELECT request_id, image_blob, replayed FROM emb_embed_clip_vit_b_32")
    assert len({r[0] for r in rows}) == 3 and not any(r[2] for r in rows)
    assert all(r[1].startswith((tmp_path / "blobs").resolve().as_uri()) for r in rows)

    prefix = rows[0][0].rsplit(":", 1)[0]
    code, _, err = await imgstream(broker, topics, "replay", "--request-id-prefix", prefix,
                                   "--task", "embed_clip_vit_b_32")
    assert code == 0 and "published 3" in err, err
    # a new sink group reads everything again, including the 3 replayed results
    kafka, sink = sink_configs(broker, topics, db)
    await sink_until(kafka, sink, lambda s: s.stats.records >= 9, timeout_s=120)
    assert count(db, "emb_embed_clip_vit_b_32") == 3  # replaced, not added
    assert count(db, "results") == 3
    replayed = query(db, "SELECT count(*) FROM emb_embed_clip_vit_b_32 WHERE replayed")[0][0]
    assert replayed == 3
