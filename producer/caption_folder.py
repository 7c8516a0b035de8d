"""`imgstream caption-folder DIR`: a caption `<name>.txt` beside every image of a folder."""

from __future__ import annotations

import sys
from dataclasses import dataclass
from pathlib import Path

from imgstream.blobs import BlobStore
from imgstream.kafka_clients import KafkaLike
from imgstream.producer.submit import IMAGE_SUFFIXES, ImageInput, build_requests, find_images, submit
from imgstream.schemas.events import ResultEvent, Task


def caption_path(image: Path) -> Path:
    return image.with_suffix(".txt")


def images_to_caption(folder: Path, *, recursive: bool, force: bool) -> tuple[list[Path], list[Path]]:
    """(images to caption, images skipped because their .txt exists)."""
    images = find_images(folder) if recursive else sorted(
        p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
    todo, skipped = [], []
    for image in images:
        (todo if force or not caption_path(image).exists() else skipped).append(image)
    return todo, skipped


@dataclass
class CaptionReport:
    written: int = 0
    skipped: int = 0
    failed: int = 0
    missing: int = 0


async def caption_folder(kafka: KafkaLike, requests_topic: str, results_topic: str, folder: Path, *,
                         store: BlobStore | None, max_length: int, force: bool, recursive: bool,
                         timeout_s: float, progress: bool = True) -> CaptionReport:
    """Submit a describe_image request per image, wait, and write each caption beside its image."""
    todo, skipped = images_to_caption(folder, recursive=recursive, force=force)
    report = CaptionReport(skipped=len(skipped))
    if not todo:
        return report
    task = Task(operation_id="caption", type="describe_image",
                params={"target": "whole_image", "max_length": max_length})
    images = [ImageInput.of_file(p, store) for p in todo]
    requests = build_requests(images, [task], prefix="caption")
    path_of = {o.request.request_id: p for o, p in zip(requests, todo)}
    results, missing = await submit(kafka, requests_topic, results_topic, requests, wait=True,
                                    timeout_s=timeout_s, progress=progress)
    report.missing = missing
    for result in results:
        _write_caption(path_of[result.request_id], result, report)
    return report


def _write_caption(image: Path, result: ResultEvent, report: CaptionReport) -> None:
    if result.status != "success" or not isinstance(result.data, str):
        report.failed += 1
        print(f"{image}: {result.status} {result.error_code}: {result.error_message}", file=sys.stderr)
        return
    target = caption_path(image)
    tmp = target.with_name(target.name + ".tmp")
    tmp.write_text(result.data.strip() + "\n", encoding="utf-8")
    tmp.replace(target)
    report.written += 1
