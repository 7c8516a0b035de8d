"""scripts/profile_summary.py: py-spy's collapsed stacks sorted into the stream's cost categories."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pytest

SCRIPTS = Path(__file__).resolve().parent.parent / "scripts"
LIB = "/usr/lib/python3.11"
SITE = "/venv/lib/python3.11/site-packages"
REPO = "/repo"


@pytest.fixture(scope="module")
def summary():
    spec = importlib.util.spec_from_file_location("profile_summary", SCRIPTS / "profile_summary.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules["profile_summary"] = module  # dataclasses look their module up by name
    spec.loader.exec_module(module)
    yield module
    sys.modules.pop("profile_summary", None)


LOOP = [f"BaseEventLoop._run_once ({LIB}/asyncio/base_events.py:1922)", f"Handle._run ({LIB}/asyncio/events.py:80)"]


def stack(*frames: str) -> list[str]:
    return LOOP + list(frames)


def frames(summary, texts: list[str]):
    return [summary.Frame.parse(t, REPO) for t in texts]


CASES = [
    # pydantic under the request decoder is validation; its own lines (orjson.loads) are parsing
    (stack(f"Worker._handle ({REPO}/consumer/worker.py:416)", f"decode_request ({REPO}/schemas/codec.py:70)",
           f"BaseModel.model_validate ({SITE}/pydantic/main.py:792)"), "validation"),
    (stack(f"Worker._handle ({REPO}/consumer/worker.py:416)", f"decode_request ({REPO}/schemas/codec.py:62)"),
     "consume and parse"),
    # pydantic elsewhere takes the category of its caller
    (stack(f"_RequestRun.result ({REPO}/analysis/engine.py:492)", f"task_result ({REPO}/analysis/results.py:46)",
           f"BaseModel.model_construct ({SITE}/pydantic/main.py:300)"), "result building"),
    # a socket write under aiokafka's sender is produce; under aiohttp's client, http fetch
    (stack(f"Sender._send_produce_req ({SITE}/aiokafka/producer/sender.py:200)",
           f"AIOKafkaConnection.send ({SITE}/aiokafka/conn.py:500)",
           f"_SelectorSocketTransport.write ({LIB}/asyncio/selector_events.py:1057)"), "produce"),
    (stack(f"ImageFetcher._request ({REPO}/consumer/fetch.py:450)",
           f"StreamWriter._write ({SITE}/aiohttp/http_writer.py:80)",
           f"_SelectorSocketTransport.write ({LIB}/asyncio/selector_events.py:1057)"), "http fetch"),
    # the thread hop of the blob reader belongs to the blob read
    (stack(f"ImageFetcher._read_blob ({REPO}/consumer/fetch.py:378)", f"FileBlobReader.read ({REPO}/consumer/fetch.py:226)",
           f"to_thread ({LIB}/asyncio/threads.py:25)",
           f"BaseEventLoop.run_in_executor ({LIB}/asyncio/base_events.py:830)"), "blob read"),
    (stack(f"Engine._decode ({REPO}/analysis/engine.py:235)", f"decode_image ({REPO}/analysis/imaging.py:136)",
           f"ImageFile.load ({SITE}/PIL/ImageFile.py:425)"), "decode"),
    (stack(f"GroupCoordinator._do_commit_offsets ({SITE}/aiokafka/consumer/group_coordinator.py:900)",
           f"Int64.decode ({SITE}/aiokafka/protocol/types.py:50)"), "acknowledgement and offset tracking"),
    (stack(f"Worker._process ({REPO}/consumer/worker.py:379)",
           f"MetricWrapperBase.labels ({SITE}/prometheus_client/metrics.py:180)"), "metrics"),
    (stack(f"Fetcher._fetch_requests_routine ({SITE}/aiokafka/consumer/fetcher.py:400)"), "consume and parse"),
    # torchvision's JPEG decoder and torch's op dispatch under it are decode, not models
    (stack(f"decode_image ({REPO}/imgstream/analysis/imaging.py:134)",
           f"decode_jpeg ({SITE}/torchvision/io/image.py:260)", f"is_tracing ({SITE}/torch/jit/_trace.py:1100)"),
     "decode"),
    (stack(f"_decode_jpeg_direct ({REPO}/imgstream/analysis/imaging.py:196)",
           f"OpOverload.__call__ ({SITE}/torch/_ops.py:840)"), "decode"),
    # the worker's rooms, as installed under the one import name
    (stack(f"Intake._request ({REPO}/imgstream/consumer/intake.py:210)",
           f"RequestHandler.process ({REPO}/imgstream/consumer/handling.py:60)"), "request glue (worker's own lines)"),
    (stack(f"Intake.run ({REPO}/imgstream/consumer/intake.py:70)",
           f"Intake._take ({REPO}/imgstream/consumer/intake.py:180)"), "consume and parse"),
    (stack(f"RequestHandler.publish ({REPO}/imgstream/consumer/handling.py:170)",
           f"Publisher.results ({REPO}/imgstream/consumer/publish.py:180)"), "produce"),
    (stack(f"RequestHandler.handle ({REPO}/imgstream/consumer/handling.py:110)",
           f"RequestHandler.fit_all ({REPO}/imgstream/consumer/handling.py:160)"), "result building"),
    (stack(f"Checkpoint.commit ({REPO}/imgstream/consumer/checkpoint.py:90)"), "acknowledgement and offset tracking"),
    # result batches close on the loop's timer, under no request's frame; the key's hash is produce too
    (stack(f"PartitionBatches._flush ({REPO}/imgstream/consumer/batches.py:95)",
           f"PartitionBatches._close ({REPO}/imgstream/consumer/batches.py:101)"), "produce"),
    (stack(f"murmur2 ({REPO}/imgstream/kafka_clients/partitioner.py:30)"), "produce"),
    (stack(f"RequestHandler.analyse ({REPO}/imgstream/consumer/handling.py:240)",
           f"scan ({REPO}/imgstream/analysis/jpeg_header.py:60)"), "decode"),
    (stack(f"RequestHandler.process ({REPO}/imgstream/consumer/handling.py:60)",
           f"_RememberedLabels.labels ({REPO}/imgstream/service/metrics.py:40)"), "metrics"),
    (stack(f"report_periodically ({REPO}/imgstream/consumer/report.py:30)",
           f"Logger.info ({LIB}/logging/__init__.py:1489)"), "logging"),
    (stack(f"ImageFetcher._read_blob ({REPO}/imgstream/consumer/fetch.py:170)",
           f"FileBlobReader.read ({REPO}/imgstream/consumer/blob_readers.py:60)",
           f"to_thread ({LIB}/asyncio/threads.py:25)"), "blob read"),
    # nothing specific: the generic category of the frame nearest the leaf
    (stack(f"AIOKafkaConnection._read ({SITE}/aiokafka/conn.py:540)",
           f"Struct.decode ({SITE}/aiokafka/protocol/struct.py:40)"), "aiokafka internals"),
    (LOOP, "asyncio/event-loop overhead"),
    # waiting threads are left out
    ([f"Thread._bootstrap ({LIB}/threading.py:995)", f"_worker ({LIB}/concurrent/futures/thread.py:81)"], "idle"),
    (LOOP[:1] + [f"EpollSelector.select ({LIB}/selectors.py:468)"], "idle"),
    ([f"something ({REPO}/elsewhere/x.py:1)"], "other"),
]


@pytest.mark.parametrize("texts, expected", CASES, ids=[c[1] + str(i) for i, c in enumerate(CASES)])
def test_each_stack_goes_to_its_category(summary, texts, expected):
    assert summary.classify(frames(summary, texts)) == expected, texts


def test_module_paths_are_library_or_repository_relative(summary):
    assert summary.module_of(f"{SITE}/aiokafka/conn.py", REPO) == "aiokafka/conn.py"
    assert summary.module_of(f"{LIB}/asyncio/events.py", REPO) == "asyncio/events.py"
    assert summary.module_of(f"{REPO}/consumer/fetch.py", REPO) == "consumer/fetch.py"
    assert summary.module_of("/elsewhere/checkout/analysis/engine.py", REPO) == "analysis/engine.py"
    assert summary.module_of("<frozen posixpath>", REPO) == "posixpath.py"


def write_profile(tmp_path: Path, lines: list[str], meta: dict | None) -> Path:
    path = tmp_path / "W4.txt"
    path.write_text("\n".join(lines) + "\n")
    if meta is not None:
        path.with_suffix(".meta.json").write_text(json.dumps(meta))
    return path


def test_samples_are_scaled_to_each_threads_own_cpu(summary, tmp_path):
    decode = ";".join(stack(f"decode_image ({REPO}/analysis/imaging.py:136)"))
    produce = ";".join(stack(f"Publisher.results ({REPO}/consumer/publish.py:180)"))
    blob = f"FileBlobReader._read ({REPO}/consumer/fetch.py:229)"
    idle = f"_worker ({LIB}/concurrent/futures/thread.py:81)"
    path = write_profile(tmp_path, [
        f"thread (100): MainThread;{decode} 300",
        f"thread (100): MainThread;{produce} 100",
        f"thread (101): asyncio_0;{blob} 50",
        f"thread (101): asyncio_0;{idle} 500",
    ], {"rate_hz": 100, "requests": 1000, "pid": 100,
        "threads": {"100": {"cpu_s": 2.0, "runqueue_wait_s": 0.5}, "101": {"cpu_s": 0.25, "runqueue_wait_s": 0.1}}})

    samples, meta = summary.load(path, REPO)
    result = summary.summarise(samples, meta)

    # 400 loop samples at 100/s are 4 s sampled for 2 CPU s: each counts half; the pool thread's
    # 50 busy samples carry its 0.25 CPU s, its 500 waiting ones nothing.
    assert result.scaled
    assert result.idle_samples == 500
    assert result.seconds["decode"]["loop"] == pytest.approx(1.5)
    assert result.seconds["produce"]["loop"] == pytest.approx(0.5)
    assert result.seconds["blob read"]["threads"] == pytest.approx(0.25)
    table = summary.render(result, markdown=True)
    assert "| decode | 1.500 | 0.000 | 1.500 | 66.7 | 300 |" in table, table
    assert "| all | 2.000 | 0.250 | 2.250 | 100.0 | 450 |" in table, table


def test_without_the_meta_file_seconds_are_samples_over_the_rate(summary, tmp_path):
    line = ";".join(stack(f"encode ({REPO}/schemas/codec.py:41)"))
    path = write_profile(tmp_path, [f"thread (7): MainThread;{line} 25"], None)

    samples, meta = summary.load(path, REPO)
    result = summary.summarise(samples, {"rate_hz": 250, "requests": None} if meta is None else meta)

    assert not result.scaled
    assert result.seconds["JSON encoding"]["loop"] == pytest.approx(0.1)


def test_a_speedscope_file_reads_like_the_raw_one(summary, tmp_path):
    doc = {
        "shared": {"frames": [
            {"name": "Handle._run", "file": f"{LIB}/asyncio/events.py", "line": 80},
            {"name": "task_result", "file": f"{REPO}/analysis/results.py", "line": 46},
            {"name": "thread (9): MainThread", "file": "", "line": 0},
        ]},
        "profiles": [{"type": "sampled", "name": 'Thread 9 "MainThread"', "samples": [[2, 0, 1], [2, 0]],
                      "weights": [0.004, 0.004]}],
    }
    path = tmp_path / "W4.speedscope.json"
    path.write_text(json.dumps(doc))
    path.with_suffix(".meta.json").write_text(json.dumps({"rate_hz": 250, "requests": 2, "pid": 9}))

    samples, meta = summary.load(path, REPO)

    assert [(s.tid, s.thread, s.count) for s in samples] == [("9", "MainThread", 1), ("9", "MainThread", 1)]
    assert [summary.classify(s.frames) for s in samples] == ["result building", "asyncio/event-loop overhead"]


def test_the_command_line_prints_the_table(summary, tmp_path, capsys):
    line = ";".join(stack(f"task_result ({REPO}/analysis/results.py:46)"))
    path = write_profile(tmp_path, [f"thread (5): MainThread;{line} 10"],
                         {"rate_hz": 100, "requests": 10, "pid": 5, "threads": {"5": {"cpu_s": 0.1,
                                                                                    "runqueue_wait_s": 0.0}}})
    out_json = tmp_path / "summary.json"

    assert summary.main([str(path), "--explain", "2", "--json", str(out_json)]) == 0

    out = capsys.readouterr().out
    assert "result building" in out and "task_result (analysis/results.py) 10" in out, out
    figures = json.loads(out_json.read_text())
    assert figures["ms_per_request"]["result building"]["loop"] == pytest.approx(10.0)
