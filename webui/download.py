"""Downloading a model branch from the Hub into ``models/``, safely.

Files go into a hidden staging folder (``models/.NAME.partial``) through
``huggingface_hub``'s downloader; a file's bytes are appended to
``FILE.part`` as they arrive, so a later run resumes it with an HTTP range
request (huggingface_hub itself deletes partial files on failure). Each
file is checked against the Hub's sha256 (LFS) or git blob id, and only a
complete, verified branch is renamed into ``models/NAME``. A failed or
cancelled download therefore never leaves a folder that looks like a model,
and running it again picks up where it stopped.

    python -m webui.download TheBloke/OpenChat_v3.2-GPTQ:gptq-4bit-32g-actorder_True
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from huggingface_hub import HfApi, get_hf_file_metadata, hf_hub_download, hf_hub_url
from huggingface_hub.file_download import http_get
from huggingface_hub.utils import build_hf_headers
from huggingface_hub.errors import (
    EntryNotFoundError,
    GatedRepoError,
    HfHubHTTPError,
    RepositoryNotFoundError,
    RevisionNotFoundError,
)
from tqdm.auto import tqdm

from backends.quant_config import QuantConfig, QuantConfigError, parse_quant_config
from webui.repo_spec import RepoSpec, parse_repo_spec

MODEL_FILES = {
    "config.json",
    "generation_config.json",
    "quantize_config.json",
    "quant_config.json",
    "tokenizer.json",
    "tokenizer.model",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "added_tokens.json",
    "chat_template.jinja",
    "chat_template.json",
    "vocab.json",
    "merges.txt",
    "model.safetensors.index.json",
    "README.md",
    "LICENSE",
}
PICKLE_SUFFIXES = (".bin", ".pt", ".pth")
STATE_FILE = ".download.json"
DISK_MARGIN = 64 * 2**20


class DownloadError(RuntimeError):
    """A download that cannot start or did not finish; the message is for the user."""


class DownloadCancelled(DownloadError):
    pass


@dataclass(frozen=True)
class RemoteFile:
    path: str
    size: int
    sha256: str | None  # LFS files
    blob_id: str | None  # git blob sha1 of small files


@dataclass(frozen=True)
class BranchInfo:
    name: str
    files: tuple[RemoteFile, ...]
    quant: QuantConfig | None
    quant_note: str  # why quant is None, for the table
    weights_bytes: int
    download_bytes: int
    vram_bytes: int

    def describe_quant(self) -> str:
        if self.quant is None:
            return self.quant_note
        group = "none" if self.quant.group_size == -1 else str(self.quant.group_size)
        return f"{self.quant.bits}-bit, group {group}, act-order {'yes' if self.quant.desc_act else 'no'}"


@dataclass
class DownloadProgress:
    done_bytes: int
    total_bytes: int
    bytes_per_second: float
    current_file: str

    @property
    def fraction(self) -> float:
        return self.done_bytes / self.total_bytes if self.total_bytes else 1.0

    @property
    def eta_seconds(self) -> float | None:
        if self.bytes_per_second <= 0:
            return None
        return (self.total_bytes - self.done_bytes) / self.bytes_per_second

    def describe(self) -> str:
        eta = self.eta_seconds
        eta_text = f", {eta:.0f} s left" if eta is not None else ""
        return (
            f"{format_bytes(self.done_bytes)} of {format_bytes(self.total_bytes)} "
            f"({self.fraction:.0%}) at {format_bytes(self.bytes_per_second)}/s{eta_text} — {self.current_file}"
        )


def format_bytes(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if abs(n) < 1024 or unit == "TB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} TB"


def wanted(path: str, allow_pickle: bool) -> bool:
    """Whether a repo file is part of what the model needs."""
    if "/" in path:
        return False
    if path in MODEL_FILES or path.endswith(".safetensors"):
        return True
    if path.endswith(PICKLE_SUFFIXES) or path == "pytorch_model.bin.index.json":
        return allow_pickle and not path.startswith(("training_args", "optimizer", "scheduler"))
    return False


def is_weight(path: str) -> bool:
    return path.endswith((".safetensors",) + PICKLE_SUFFIXES)


def estimate_vram(weights_bytes: int, config: dict | None, context: int = 4096) -> int:
    """Weights + fp16 KV cache for ``context`` tokens + 10% for activations and the allocator."""
    kv = 0
    if config:
        try:
            heads = config.get("num_key_value_heads") or config["num_attention_heads"]
            head_dim = config.get("head_dim") or config["hidden_size"] // config["num_attention_heads"]
            kv = 2 * config["num_hidden_layers"] * heads * head_dim * context * 2
        except (KeyError, TypeError, ZeroDivisionError):
            kv = 0
    return int((weights_bytes + kv) * 1.1)


def _friendly(exc: Exception, spec: RepoSpec, branches: list[str] | None = None) -> DownloadError:
    if isinstance(exc, GatedRepoError):
        return DownloadError(
            f"{spec.repo_id} is gated: accept its license on the Hub, then give an access token (HF_TOKEN)"
        )
    if isinstance(exc, RevisionNotFoundError):
        known = f"; branches: {', '.join(branches)}" if branches else ""
        return DownloadError(f"branch '{spec.revision}' does not exist in {spec.repo_id}{known}")
    if isinstance(exc, RepositoryNotFoundError):
        return DownloadError(
            f"repository {spec.repo_id} was not found (if it is private, give an access token)"
        )
    if isinstance(exc, EntryNotFoundError):
        return DownloadError(f"a file listed by {spec} vanished from the Hub while downloading; try again")
    if isinstance(exc, HfHubHTTPError):
        return DownloadError(f"the Hub refused the request for {spec}: {exc}")
    if isinstance(exc, OSError) and getattr(exc, "errno", None) == 28:
        return DownloadError("the disk is full; free some space and download again to resume")
    return DownloadError(f"could not reach the Hub for {spec}: {exc}")


class Hub:
    """The Hub as this app uses it; ``endpoint`` defaults to HF_ENDPOINT or huggingface.co."""

    def __init__(self, token: str | None = None, endpoint: str | None = None):
        self.token = token or os.environ.get("HF_TOKEN") or None
        self.endpoint = endpoint
        self.api = HfApi(endpoint=endpoint, token=self.token)

    def branches(self, spec: RepoSpec) -> list[str]:
        try:
            refs = self.api.list_repo_refs(spec.repo_id, token=self.token)
        except Exception as exc:
            raise _friendly(exc, spec) from exc
        names = sorted(b.name for b in refs.branches)
        return ["main"] + [n for n in names if n != "main"] if "main" in names else names

    def files(self, spec: RepoSpec) -> list[RemoteFile]:
        try:
            entries = list(self.api.list_repo_tree(spec.repo_id, revision=spec.revision, token=self.token))
        except RevisionNotFoundError as exc:
            raise _friendly(exc, spec, self.branches(spec)) from exc
        except Exception as exc:
            raise _friendly(exc, spec) from exc
        files = []
        for e in entries:
            if getattr(e, "size", None) is None:
                continue  # a folder
            lfs = getattr(e, "lfs", None)
            files.append(RemoteFile(e.path, e.size, lfs.sha256 if lfs else None, None if lfs else e.blob_id))
        return files

    def read_json(self, spec: RepoSpec, filename: str) -> dict | None:
        with tempfile.TemporaryDirectory() as tmp:
            try:
                path = hf_hub_download(
                    spec.repo_id, filename, revision=spec.revision, local_dir=tmp, token=self.token, endpoint=self.endpoint
                )
            except EntryNotFoundError:
                return None
            except Exception as exc:
                raise _friendly(exc, spec) from exc
            try:
                data = json.loads(Path(path).read_text(encoding="utf-8"))
            except (json.JSONDecodeError, UnicodeDecodeError) as exc:
                raise QuantConfigError(f"{filename}: not valid JSON") from exc
            if not isinstance(data, dict):
                raise QuantConfigError(f"{filename}: expected a JSON object")
            return data

    def branch_info(self, spec: RepoSpec, allow_pickle: bool = False) -> BranchInfo:
        files = self.files(spec)
        names = {f.path for f in files}
        quant, note, config = None, "not quantized", None
        try:
            config = self.read_json(spec, "config.json") if "config.json" in names else None
            if "quantize_config.json" in names:
                quant = parse_quant_config(self.read_json(spec, "quantize_config.json"), "quantize_config.json")
            elif config and config.get("quantization_config") is not None:
                quant = parse_quant_config(config["quantization_config"], "config.json: quantization_config")
        except QuantConfigError as exc:
            note = f"unsupported: {exc}"
        selected = [f for f in files if wanted(f.path, allow_pickle)]
        weights = sum(f.size for f in selected if is_weight(f.path))
        return BranchInfo(
            name=spec.revision,
            files=tuple(files),
            quant=quant,
            quant_note=note,
            weights_bytes=weights,
            download_bytes=sum(f.size for f in selected),
            vram_bytes=estimate_vram(weights, config),
        )


class _Tracker:
    """Bytes done across files, rate and cancellation, fed by huggingface_hub's progress bars."""

    def __init__(self, total: int, done: int, report: Callable[[DownloadProgress], None], cancel: threading.Event):
        self.total, self.done_files = total, done
        self.report, self.cancel = report, cancel
        self.current, self.current_name = 0, ""
        self.samples: list[tuple[float, int]] = []

    def start_file(self, initial: int) -> None:
        self.current = initial
        self.tick(0)

    def finish_file(self, size: int) -> None:
        self.done_files += size
        self.current = 0

    def tick(self, n: int) -> None:
        if self.cancel.is_set():
            raise DownloadCancelled("download cancelled; start it again to resume")
        self.current += n
        now, done = time.monotonic(), self.done_files + self.current
        self.samples = [s for s in self.samples if now - s[0] < 5.0] + [(now, done)]
        t0, d0 = self.samples[0]
        rate = (done - d0) / (now - t0) if now > t0 else 0.0
        self.report(DownloadProgress(done, self.total, rate, self.current_name))

    def bar_class(self) -> type:
        tracker = self

        class Bar(tqdm):
            def __init__(self, *args, **kwargs):
                kwargs["disable"] = True
                super().__init__(*args, **kwargs)
                tracker.start_file(kwargs.get("initial", 0) or 0)

            def update(self, n=1):
                tracker.tick(int(n or 0))
                return super().update(n)

        return Bar


def _hash_file(h, path: Path) -> str:
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _git_blob_sha1(path: Path) -> str:
    h = hashlib.sha1()
    h.update(f"blob {path.stat().st_size}\0".encode())
    return _hash_file(h, path)


def _sha256(path: Path) -> str:
    return _hash_file(hashlib.sha256(), path)


def verified(path: Path, remote: RemoteFile) -> bool:
    if not path.is_file() or path.stat().st_size != remote.size:
        return False
    if remote.sha256:
        return _sha256(path) == remote.sha256
    if remote.blob_id:
        return _git_blob_sha1(path) == remote.blob_id
    return True


def _fetch(hub: Hub, spec: RepoSpec, remote: RemoteFile, staging: Path, tracker: "_Tracker") -> None:
    """Download one file into ``staging``, resuming its ``.part`` file, and verify it."""
    url = hf_hub_url(spec.repo_id, remote.path, revision=spec.revision, endpoint=hub.endpoint)
    meta = get_hf_file_metadata(url, token=hub.token)
    part = staging / f"{remote.path}.part"
    resume = part.stat().st_size if part.exists() else 0
    if resume > remote.size:
        part.unlink()
        resume = 0
    with part.open("ab") as f:
        http_get(
            meta.location,
            f,
            resume_size=resume,
            headers=build_hf_headers(token=hub.token),
            expected_size=remote.size,
            displayed_filename=remote.path,
            tqdm_class=tracker.bar_class(),
        )
    if not verified(part, remote):
        part.unlink(missing_ok=True)
        raise DownloadError(f"{remote.path} failed its checksum; download again to fetch it anew")
    os.replace(part, staging / remote.path)


def staging_dir(models_dir: Path, spec: RepoSpec) -> Path:
    return models_dir / f".{spec.folder_name()}.partial"


def _check_disk(models_dir: Path, needed: int) -> None:
    free = shutil.disk_usage(models_dir).free
    if needed + DISK_MARGIN > free:
        raise DownloadError(
            f"not enough disk space: the download needs {format_bytes(needed)} more, "
            f"{format_bytes(free)} is free in {models_dir}"
        )


def _prepare_staging(staging: Path, spec: RepoSpec, files: list[RemoteFile]) -> None:
    """Keep what an earlier attempt fetched only if it was for the same files."""
    fingerprint = {f.path: [f.size, f.sha256 or f.blob_id] for f in files}
    state = staging / STATE_FILE
    if staging.is_dir():
        try:
            same = json.loads(state.read_text()).get("files") == fingerprint
        except (OSError, json.JSONDecodeError, AttributeError):
            same = False
        if not same:
            shutil.rmtree(staging)
    staging.mkdir(parents=True, exist_ok=True)
    state.write_text(json.dumps({"repo": str(spec), "files": fingerprint}))


@dataclass
class DownloadRequest:
    spec: RepoSpec
    models_dir: Path
    allow_pickle: bool = False
    progress: Callable[[DownloadProgress], None] = lambda _: None
    cancel: threading.Event = field(default_factory=threading.Event)


def download(request: DownloadRequest, hub: Hub | None = None) -> Path:
    """Download the branch and return the model folder; raises DownloadError with a user-facing message."""
    hub = hub or Hub()
    spec, models_dir = request.spec, Path(request.models_dir)
    models_dir.mkdir(parents=True, exist_ok=True)
    target = models_dir / spec.folder_name()
    if target.exists():
        raise DownloadError(f"{target.name} already exists in {models_dir}; delete it to download again")
    files = hub.files(spec)
    selected = [f for f in files if wanted(f.path, request.allow_pickle)]
    if not any(is_weight(f.path) for f in selected):
        pickles = [f.path for f in files if f.path.endswith(PICKLE_SUFFIXES)]
        if pickles:
            raise DownloadError(
                f"{spec} has only pickled weights ({', '.join(pickles)}); enable 'allow pickled weights' to download them"
            )
        raise DownloadError(f"{spec} has no weight files (.safetensors)")
    if not any(f.path == "config.json" for f in selected):
        raise DownloadError(f"{spec} has no config.json; it is not a transformers model")

    staging = staging_dir(models_dir, spec)
    _prepare_staging(staging, spec, selected)
    pending = [f for f in selected if not verified(staging / f.path, f)]
    done = sum(f.size for f in selected) - sum(f.size for f in pending)
    _check_disk(models_dir, sum(f.size for f in pending))
    tracker = _Tracker(sum(f.size for f in selected), done, request.progress, request.cancel)
    for remote in pending:
        tracker.current_name = remote.path
        try:
            _fetch(hub, spec, remote, staging, tracker)
        except DownloadError:
            raise
        except Exception as exc:
            raise _friendly(exc, spec) from exc
        tracker.finish_file(remote.size)
    tracker.tick(0)
    (staging / STATE_FILE).unlink(missing_ok=True)
    os.replace(staging, target)
    return target


def _print_progress(p: DownloadProgress) -> None:
    width = 30
    filled = int(width * p.fraction)
    sys.stderr.write(f"\r[{'#' * filled}{'.' * (width - filled)}] {p.describe()[:100]:<100}")
    sys.stderr.flush()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Download a GPTQ model branch from the Hub into models/.")
    parser.add_argument("model", help="owner/repo, owner/repo:branch or a Hub URL")
    parser.add_argument("--models-dir", type=Path, default=Path("models"))
    parser.add_argument("--token", default=None, help="Hub access token for gated or private repos (or HF_TOKEN)")
    parser.add_argument("--list", action="store_true", help="list the branches and their quantization, then exit")
    parser.add_argument("--allow-pickle", action="store_true", help="also download pickled .bin/.pt weights")
    opts = parser.parse_args(argv)
    try:
        spec = parse_repo_spec(opts.model)
        hub = Hub(token=opts.token)
        if opts.list:
            for name in hub.branches(spec):
                info = hub.branch_info(RepoSpec(spec.owner, spec.repo, name), opts.allow_pickle)
                print(f"{name:45} {info.describe_quant():40} {format_bytes(info.download_bytes):>10}  "
                      f"~{format_bytes(info.vram_bytes)} VRAM")
            return 0
        path = download(DownloadRequest(spec, opts.models_dir, opts.allow_pickle, _print_progress), hub)
    except (DownloadError, ValueError) as exc:
        print(f"\nerror: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("\ninterrupted; run the same command again to resume", file=sys.stderr)
        return 130
    print(f"\nsaved to {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
