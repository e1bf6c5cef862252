"""Downloads through huggingface_hub against the Hub-compatible server on 127.0.0.1."""

import hashlib
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from backends.quant_config import load_quant_config
from backends.weights import find_weight_files
from tests.gptq_testing import tiny_config, write_random_checkpoint
from tests.hub_server import HubServer
from webui.download import DownloadCancelled, DownloadError, DownloadRequest, Hub, download, staging_dir
from webui.repo_spec import RepoSpec, RepoSpecError, parse_repo_spec

ROOT = Path(__file__).resolve().parent.parent
REPO = ("TheBloke", "Tiny-GPTQ")


@pytest.fixture(scope="module")
def hub_root(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("hub")
    repo = root.joinpath(*REPO)
    write_random_checkpoint(repo / "main", tiny_config(), bits=4, group_size=128, act_order=False)
    write_random_checkpoint(repo / "gptq-4bit-32g-actorder_True", tiny_config(), bits=4, group_size=32, act_order=True)
    write_random_checkpoint(repo / "gptq-8bit-128g-actorder_False", tiny_config(), bits=8, group_size=128,
                          act_order=False, quantize_config=False)
    # a model of ~17 MB, bigger than huggingface_hub's 10 MB read chunk, to interrupt half-way
    write_random_checkpoint(repo / "big", tiny_config(hidden_size=512, intermediate_size=512, vocab_size=8192), seed=3)
    (repo / "main" / "README.md").write_text("# Tiny GPTQ\n")
    (repo / "main" / "training_args.bin").write_bytes(b"\x80\x04junk")
    pickles = root / "TheBloke" / "Pickled-GPTQ" / "main"
    pickles.mkdir(parents=True)
    shutil.copy(repo / "main" / "config.json", pickles / "config.json")
    (pickles / "pytorch_model.bin").write_bytes(os.urandom(4096))
    return root


@pytest.fixture
def hub(hub_root):
    with HubServer(hub_root) as server:
        yield server


def sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.mark.parametrize(
    "text, expected",
    [
        ("TheBloke/OpenChat_v3.2-GPTQ", RepoSpec("TheBloke", "OpenChat_v3.2-GPTQ")),
        ("TheBloke/OpenChat_v3.2-GPTQ:gptq-4bit-32g-actorder_True",
         RepoSpec("TheBloke", "OpenChat_v3.2-GPTQ", "gptq-4bit-32g-actorder_True")),
        ("  owner/repo:main ", RepoSpec("owner", "repo", "main")),
        ("https://huggingface.co/TheBloke/Llama-2-7B-GPTQ/tree/gptq-4bit-32g-actorder_True",
         RepoSpec("TheBloke", "Llama-2-7B-GPTQ", "gptq-4bit-32g-actorder_True")),
        ("https://huggingface.co/TheBloke/Llama-2-7B-GPTQ", RepoSpec("TheBloke", "Llama-2-7B-GPTQ")),
    ],
)
def test_valid_specs(text, expected):
    assert parse_repo_spec(text) == expected


@pytest.mark.parametrize(
    "text, message",
    [
        ("", "enter a model"),
        ("justaname", "exactly one '/'"),
        ("a/b/c", "exactly one '/'"),
        ("../etc:main", "not a valid owner"),
        ("owner/..", "not a valid repository name"),
        ("owner/repo:../../x", "not a valid branch"),
        ("owner/re po", "spaces are not allowed"),
        ("/repo", "owner is empty"),
        ("owner/", "repository name is empty"),
        ("owner/repo:", "branch after ':' is empty"),
        ("https://evil.example/owner/repo", "only huggingface.co"),
        ("owner/repo:branch;rm -rf", "spaces are not allowed"),
        ("owner/repo:bad;branch", "not a valid branch"),
    ],
)
def test_bad_specs_are_rejected_clearly(text, message):
    with pytest.raises(RepoSpecError, match=message):
        parse_repo_spec(text)


def test_folder_names():
    assert parse_repo_spec("TheBloke/X-GPTQ").folder_name() == "TheBloke_X-GPTQ"
    assert parse_repo_spec("TheBloke/X-GPTQ:main").folder_name() == "TheBloke_X-GPTQ"
    assert parse_repo_spec("TheBloke/X-GPTQ:gptq-4bit-32g").folder_name() == "TheBloke_X-GPTQ_gptq-4bit-32g"


def test_branches_are_listed_with_their_quantization(hub):
    h = Hub(endpoint=hub.url)
    spec = RepoSpec(*REPO)
    assert h.branches(spec) == ["main", "big", "gptq-4bit-32g-actorder_True", "gptq-8bit-128g-actorder_False"]
    main = h.branch_info(spec)
    assert main.describe_quant() == "4-bit, group 128, act-order no"
    act = h.branch_info(RepoSpec(*REPO, "gptq-4bit-32g-actorder_True"))
    assert act.describe_quant() == "4-bit, group 32, act-order yes"
    eight = h.branch_info(RepoSpec(*REPO, "gptq-8bit-128g-actorder_False"))
    assert eight.quant.bits == 8  # read from config.json's quantization_config
    assert eight.weights_bytes > act.weights_bytes
    assert main.vram_bytes > main.weights_bytes > 0
    assert "training_args.bin" in {f.path for f in main.files}
    assert main.download_bytes < sum(f.size for f in main.files)  # the pickle is not counted


@pytest.mark.parametrize("branch", ["main", "gptq-4bit-32g-actorder_True", "gptq-8bit-128g-actorder_False"])
def test_each_branch_downloads_into_its_folder(hub, hub_root, tmp_path, branch):
    spec = RepoSpec(*REPO, None if branch == "main" else branch)
    seen = []
    path = download(DownloadRequest(spec, tmp_path, progress=seen.append), Hub(endpoint=hub.url))
    assert path == tmp_path / spec.folder_name()
    source = hub_root.joinpath(*REPO, branch)
    for f in source.iterdir():
        if f.name == "training_args.bin":
            assert not (path / f.name).exists()
        else:
            assert sha(path / f.name) == sha(f)
    assert find_weight_files(path, load_quant_config(path)).files
    assert not staging_dir(tmp_path, spec).exists()
    assert [p.done_bytes for p in seen] == sorted(p.done_bytes for p in seen)
    assert seen[-1].done_bytes == seen[-1].total_bytes
    assert sorted(p.name for p in tmp_path.iterdir()) == [spec.folder_name()]


def test_missing_repo_and_branch_are_reported(hub, tmp_path):
    h = Hub(endpoint=hub.url)
    with pytest.raises(DownloadError, match="repository TheBloke/Nope was not found"):
        download(DownloadRequest(RepoSpec("TheBloke", "Nope"), tmp_path), h)
    with pytest.raises(DownloadError, match="branch 'gptq-3bit' does not exist in TheBloke/Tiny-GPTQ; branches: main, big"):
        download(DownloadRequest(RepoSpec(*REPO, "gptq-3bit"), tmp_path), h)
    assert list(tmp_path.iterdir()) == []


def test_pickled_weights_need_opt_in(hub, tmp_path):
    h = Hub(endpoint=hub.url)
    spec = RepoSpec("TheBloke", "Pickled-GPTQ")
    with pytest.raises(DownloadError, match=r"only pickled weights \(pytorch_model.bin\).*allow pickled"):
        download(DownloadRequest(spec, tmp_path), h)
    assert list(tmp_path.iterdir()) == []
    path = download(DownloadRequest(spec, tmp_path, allow_pickle=True), h)
    assert (path / "pytorch_model.bin").stat().st_size == 4096


def test_existing_folder_is_not_overwritten(hub, tmp_path):
    (tmp_path / "TheBloke_Tiny-GPTQ").mkdir()
    (tmp_path / "TheBloke_Tiny-GPTQ" / "mine.txt").write_text("keep")
    with pytest.raises(DownloadError, match="already exists"):
        download(DownloadRequest(RepoSpec(*REPO), tmp_path), Hub(endpoint=hub.url))
    assert (tmp_path / "TheBloke_Tiny-GPTQ" / "mine.txt").read_text() == "keep"


def test_cancel_then_resume_with_a_range_request(hub_root, tmp_path):
    spec = RepoSpec(*REPO, "big")
    with HubServer(hub_root, throttle=4_000_000) as server:
        h = Hub(endpoint=server.url)
        request = DownloadRequest(spec, tmp_path)

        def cancel_half_way(p):
            if p.fraction > 0.4 and p.current_file == "model.safetensors":
                request.cancel.set()

        request.progress = cancel_half_way
        with pytest.raises(DownloadCancelled, match="start it again to resume"):
            download(request, h)
        assert not (tmp_path / spec.folder_name()).exists()
        assert staging_dir(tmp_path, spec).exists()
        server.state.requests.clear()
        path = download(DownloadRequest(spec, tmp_path), h)
        ranges = [r for m, p, r in server.state.requests if m == "GET" and p.endswith("model.safetensors")]
    assert ranges and ranges[0] and int(ranges[0].split("=")[1].split("-")[0]) > 0
    assert sha(path / "model.safetensors") == sha(hub_root.joinpath(*REPO, "big", "model.safetensors"))


def test_killed_cli_resumes_on_the_next_run(hub_root, tmp_path):
    spec = RepoSpec(*REPO, "big")
    total = hub_root.joinpath(*REPO, "big", "model.safetensors").stat().st_size
    with HubServer(hub_root, throttle=4_000_000) as server:
        env = {**os.environ, "HF_ENDPOINT": server.url, "PYTHONPATH": str(ROOT)}
        cmd = [sys.executable, "-m", "webui.download", f"{REPO[0]}/{REPO[1]}:big", "--models-dir", str(tmp_path)]
        proc = subprocess.Popen(cmd, env=env, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        staging = staging_dir(tmp_path, spec)
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            partial = list(staging.glob("model.safetensors.part")) if staging.exists() else []
            if partial and partial[0].stat().st_size > total * 0.3:
                break
            time.sleep(0.05)
        else:
            proc.kill()
            pytest.fail("the download never got going")
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        assert not (tmp_path / spec.folder_name()).exists()
        server.state.requests.clear()
        done = subprocess.run(cmd, env=env, cwd=ROOT, capture_output=True, text=True, timeout=120)
        ranges = [r for m, p, r in server.state.requests if m == "GET" and p.endswith("model.safetensors")]
    assert done.returncode == 0, done.stderr
    assert "saved to" in done.stdout
    assert ranges and ranges[0] is not None and int(ranges[0].split("=")[1].split("-")[0]) > total * 0.2
    path = tmp_path / spec.folder_name()
    assert sha(path / "model.safetensors") == sha(hub_root.joinpath(*REPO, "big", "model.safetensors"))
    assert not staging.exists()


def test_checksum_mismatch_leaves_no_model(hub, tmp_path):
    target = hub.state.root.joinpath(*REPO, "main", "model.safetensors")
    hub.state._sha256[target.resolve()] = "0" * 64
    with pytest.raises(DownloadError, match="model.safetensors failed its checksum"):
        download(DownloadRequest(RepoSpec(*REPO), tmp_path), Hub(endpoint=hub.url))
    assert not (tmp_path / "TheBloke_Tiny-GPTQ").exists()


def test_disk_full_is_reported_before_downloading(hub, tmp_path, monkeypatch):
    import webui.download as dl

    monkeypatch.setattr(dl.shutil, "disk_usage", lambda _: shutil._ntuple_diskusage(10**9, 10**9 - 1000, 1000))
    with pytest.raises(DownloadError, match="not enough disk space"):
        download(DownloadRequest(RepoSpec(*REPO), tmp_path), Hub(endpoint=hub.url))
    assert not (tmp_path / "TheBloke_Tiny-GPTQ").exists()


def test_cli_lists_branches(hub):
    env = {**os.environ, "HF_ENDPOINT": hub.url, "PYTHONPATH": str(ROOT)}
    out = subprocess.run([sys.executable, "-m", "webui.download", "TheBloke/Tiny-GPTQ", "--list"],
                         env=env, cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert "gptq-4bit-32g-actorder_True" in out.stdout and "4-bit, group 32, act-order yes" in out.stdout


def test_cli_reports_bad_ids():
    out = subprocess.run([sys.executable, "-m", "webui.download", "not a repo"], cwd=ROOT,
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 1 and "spaces are not allowed" in out.stderr


def test_broken_quantize_config_is_noted_in_the_branch_table(hub, hub_root):
    branch = hub_root.joinpath(*REPO, "main")
    original = (branch / "quantize_config.json").read_text()
    (branch / "quantize_config.json").write_text("{not json")
    try:
        info = Hub(endpoint=hub.url).branch_info(RepoSpec(*REPO))
    finally:
        (branch / "quantize_config.json").write_text(original)
    assert info.quant is None
    assert info.describe_quant() == "unsupported: quantize_config.json: not valid JSON"
