"""The local Hub-protocol server (tests/hub_server.py) against the real huggingface_hub client, timm and
transformers: every call below is real HTTP to 127.0.0.1."""

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import httpx2
import pytest
import safetensors.torch
import timm
import torch
from huggingface_hub import (
    HfApi,
    create_repo,
    hf_hub_download,
    model_info,
    snapshot_download,
)
from huggingface_hub.errors import (
    EntryNotFoundError,
    HfHubHTTPError,
    RepositoryNotFoundError,
    RevisionNotFoundError,
)

import ela_hf  # noqa: F401  (registers the cifar ResNets with timm)
from hub_server import LocalHubServer, git_blob_sha1


def _write_folder(folder: Path) -> dict[str, bytes]:
    """A small repo folder: JSON config, a real safetensors file, and a nested binary file."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text(json.dumps({"architecture": "tiny", "num_classes": 3}))
    weights = {"w": torch.arange(24, dtype=torch.float32).reshape(4, 6)}
    safetensors.torch.save_file(weights, folder / "model.safetensors")
    (folder / "extra").mkdir()
    (folder / "extra" / "blob.bin").write_bytes(bytes(range(256)) * 3 + b"\x00\xff\r\n")
    return {str(p.relative_to(folder).as_posix()): p.read_bytes() for p in folder.rglob("*") if p.is_file()}


def _snapshot_files(path: str) -> dict[str, bytes]:
    root = Path(path)
    return {str(p.relative_to(root).as_posix()): p.read_bytes() for p in root.rglob("*") if p.is_file()}


def test_upload_folder_then_download_returns_identical_bytes(local_hub, tmp_path):
    repo_id = f"{local_hub.user}/roundtrip"
    api = HfApi()  # no endpoint, no token: both come from the fixture's patched defaults
    assert api.endpoint == local_hub.endpoint

    url = create_repo(repo_id)  # the module-level function (import-time HfApi singleton)
    assert url.startswith(local_hub.endpoint) and url.repo_id == repo_id

    local_files = _write_folder(tmp_path / "upload")
    commit = api.upload_folder(repo_id=repo_id, folder_path=tmp_path / "upload", commit_message="add files")
    repo = local_hub.server.repo(repo_id)
    assert commit.oid == repo.branches["main"] and len(commit.oid) == 40
    assert commit.commit_url.startswith(local_hub.endpoint)
    assert repo.commits[commit.oid].title == "add files"
    assert dict(repo.commits[commit.oid].files) == {".gitattributes": repo.commits[commit.oid].files[".gitattributes"],
                                                    **local_files}

    snapshot = snapshot_download(repo_id)
    assert Path(snapshot).is_relative_to(local_hub.cache_dir)  # the isolated cache, not the user's
    downloaded = _snapshot_files(snapshot)
    assert {k: v for k, v in downloaded.items() if k != ".gitattributes"} == local_files

    for path, content in local_files.items():
        assert Path(hf_hub_download(repo_id, path, cache_dir=tmp_path / "other_cache")).read_bytes() == content
    tensors = safetensors.torch.load_file(hf_hub_download(repo_id, "model.safetensors"))
    assert torch.equal(tensors["w"], torch.arange(24, dtype=torch.float32).reshape(4, 6))

    # What the client actually sent over the wire.
    server = local_hub.server
    assert server.count("create_repo") == 1
    assert server.count("preupload") >= 1
    assert server.count("commit") == 1
    assert server.count("tree") >= 1  # snapshot_download lists the repo
    # snapshot_download: HEAD + GET per file; the second cache dir fetches each file again.
    assert server.count("resolve", "GET") >= 2 * len(local_files)
    assert server.count("resolve", "HEAD") >= 2 * len(local_files)
    assert all(r.authorized for r in server.requests if r.route in ("create_repo", "preupload", "commit"))
    assert all(r.status < 400 for r in server.requests)


def test_old_commit_sha_keeps_returning_old_content(local_hub, tmp_path):
    repo_id = f"{local_hub.user}/versions"
    api = HfApi(endpoint=local_hub.endpoint, token=local_hub.token)
    api.create_repo(repo_id)
    _write_folder(tmp_path / "v1")
    first = api.upload_folder(repo_id=repo_id, folder_path=tmp_path / "v1").oid
    old_config = (tmp_path / "v1" / "config.json").read_bytes()

    new_config = json.dumps({"architecture": "tiny", "num_classes": 7}).encode()
    second = api.upload_file(path_or_fileobj=new_config, path_in_repo="config.json", repo_id=repo_id).oid
    assert second != first
    assert api.list_repo_commits(repo_id)[0].commit_id == second

    assert Path(hf_hub_download(repo_id, "config.json")).read_bytes() == new_config
    assert Path(hf_hub_download(repo_id, "config.json", revision=first)).read_bytes() == old_config
    assert Path(hf_hub_download(repo_id, "config.json", revision=second)).read_bytes() == new_config
    assert _snapshot_files(snapshot_download(repo_id, revision=first))["config.json"] == old_config
    assert model_info(repo_id, revision=first).sha == first
    assert model_info(repo_id).sha == second

    # Re-uploading unchanged files makes no commit: preupload reports the remote blob ids and the client
    # drops files whose local id matches (what the real Hub's preupload enables).
    commits_before = local_hub.server.count("commit")
    api.upload_folder(repo_id=repo_id, folder_path=tmp_path / "v1", allow_patterns=["model.safetensors", "extra/*"])
    assert local_hub.server.count("commit") == commits_before
    assert api.model_info(repo_id).sha == second

    # Deleting is versioned too.
    api.delete_file("extra/blob.bin", repo_id=repo_id)
    assert "extra/blob.bin" not in {s.rfilename for s in api.model_info(repo_id).siblings}
    assert "extra/blob.bin" in {s.rfilename for s in api.model_info(repo_id, revision=first).siblings}

    # Branches and tags resolve like any revision.
    api.create_branch(repo_id, branch="v1-branch", revision=first)
    api.create_tag(repo_id, tag="v1.0", revision=first)
    for revision in ("v1-branch", "v1.0", first[:12]):
        assert Path(hf_hub_download(repo_id, "config.json", revision=revision)).read_bytes() == old_config
    assert {b.name for b in api.list_repo_refs(repo_id).branches} == {"main", "v1-branch"}


def test_model_info_lists_siblings_with_sizes_and_blob_ids(local_hub, tmp_path):
    repo_id = f"{local_hub.user}/info"
    api = HfApi()
    api.create_repo(repo_id, private=True)
    local_files = _write_folder(tmp_path / "upload")
    api.upload_folder(repo_id=repo_id, folder_path=tmp_path / "upload")

    info = api.model_info(repo_id, files_metadata=True)
    assert info.id == repo_id and info.private is True
    assert info.sha == local_hub.server.repo(repo_id).branches["main"]
    siblings = {s.rfilename: s for s in info.siblings}
    assert set(siblings) == {".gitattributes", *local_files}
    for path, content in local_files.items():
        assert siblings[path].size == len(content)
        assert siblings[path].blob_id == git_blob_sha1(content)
    assert api.file_exists(repo_id, "extra/blob.bin") and not api.file_exists(repo_id, "missing.txt")
    tree = {e.path for e in api.list_repo_tree(repo_id, path_in_repo="extra")}
    assert tree == {"extra/blob.bin"}


def test_errors_map_to_the_clients_exceptions(local_hub, tmp_path):
    api = HfApi()
    with pytest.raises(RepositoryNotFoundError):
        api.model_info(f"{local_hub.user}/does-not-exist")
    with pytest.raises(RepositoryNotFoundError):
        hf_hub_download(f"{local_hub.user}/does-not-exist", "config.json")
    with pytest.raises(RepositoryNotFoundError):
        snapshot_download(f"{local_hub.user}/does-not-exist")

    repo_id = f"{local_hub.user}/errors"
    api.create_repo(repo_id, private=True)
    with pytest.raises(RevisionNotFoundError):
        hf_hub_download(repo_id, ".gitattributes", revision="no-such-branch")
    with pytest.raises(EntryNotFoundError):
        hf_hub_download(repo_id, "missing.json")
    with pytest.raises(HfHubHTTPError) as conflict:
        api.create_repo(repo_id)
    assert conflict.value.response.status_code == 409
    assert api.create_repo(repo_id, exist_ok=True).repo_id == repo_id

    # A private repo is invisible without the token; a wrong token is refused outright.
    with pytest.raises(RepositoryNotFoundError):
        api.model_info(repo_id, token=False)
    with pytest.raises(HfHubHTTPError) as refused:
        HfApi(token="hf_wrong").upload_file(path_or_fileobj=b"x", path_in_repo="x.txt", repo_id=repo_id)
    assert refused.value.response.status_code == 401
    assert local_hub.server.count("commit") == 0
    assert local_hub.server.count(route="info", method="GET") >= 2


def test_timm_loads_hf_hub_model_through_the_server(local_hub, tmp_path):
    torch.manual_seed(0)
    model = timm.create_model("resnet20_cifar", num_classes=10).eval()
    folder = tmp_path / "timm_folder"
    folder.mkdir()
    pretrained_cfg = {k: v for k, v in model.pretrained_cfg.items() if k not in ("hf_hub_id", "architecture")}
    pretrained_cfg["num_classes"] = 10
    (folder / "config.json").write_text(
        json.dumps({"architecture": "resnet20_cifar", "num_classes": 10, "pretrained_cfg": pretrained_cfg})
    )
    safetensors.torch.save_file(model.state_dict(), folder / "model.safetensors")

    repo_id = f"{local_hub.user}/resnet20-cifar"
    HfApi().create_repo(repo_id)
    HfApi().upload_folder(repo_id=repo_id, folder_path=folder)

    loaded = timm.create_model(f"hf-hub:{repo_id}", pretrained=True).eval()
    images = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(loaded(images), model(images))
    assert local_hub.server.count("resolve", "GET", path_contains="model.safetensors") == 1


def test_timm_push_to_hf_hub_then_load_ela_model(local_hub):
    """timm's own uploader (file_exists probe, README, both weight formats) and loader, ELA weights included."""
    torch.manual_seed(0)
    model = timm.create_model("ela_resnet20_cifar", num_classes=10).eval()
    repo_id = f"{local_hub.user}/ela-resnet20-cifar"
    timm.models.push_to_hf_hub(model, repo_id, token=local_hub.token)
    files = set(local_hub.server.repo(repo_id).resolve("main").files)
    assert {"config.json", "model.safetensors", "pytorch_model.bin", "README.md"} <= files

    loaded = timm.create_model(f"hf-hub:{repo_id}", pretrained=True).eval()
    images = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(loaded(images), model(images))


def test_transformers_push_to_hub_and_from_pretrained(local_hub):
    transformers = pytest.importorskip("transformers")
    config = transformers.ResNetConfig(
        embedding_size=8, hidden_sizes=[8, 16], depths=[1, 1], num_labels=3, layer_type="basic"
    )
    torch.manual_seed(0)
    model = transformers.ResNetForImageClassification(config).eval()
    repo_id = f"{local_hub.user}/tiny-hf-resnet"
    model.push_to_hub(repo_id)

    loaded = transformers.AutoModelForImageClassification.from_pretrained(repo_id).eval()
    pixels = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(loaded(pixel_values=pixels).logits, model(pixel_values=pixels).logits)
    assert transformers.AutoConfig.from_pretrained(repo_id).hidden_sizes == [8, 16]
    assert local_hub.server.count("commit") >= 1


def test_subprocess_reaches_the_server_through_the_environment(local_hub, tmp_path):
    repo_id = f"{local_hub.user}/from-child"
    api = HfApi()
    api.create_repo(repo_id)
    api.upload_file(path_or_fileobj=b"hello from the local hub", path_in_repo="greeting.txt", repo_id=repo_id)
    script = textwrap.dedent(
        f"""
        from pathlib import Path
        from huggingface_hub import HfApi, hf_hub_download
        print(Path(hf_hub_download({repo_id!r}, "greeting.txt")).read_text())
        HfApi().upload_file(path_or_fileobj=b"child", path_in_repo="child.txt", repo_id={repo_id!r})
        """
    )
    # The fixture exported HF_ENDPOINT / HF_TOKEN / HF_HOME / HF_HUB_OFFLINE=0, so the child inherits them.
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "hello from the local hub"
    assert local_hub.server.file(repo_id, "child.txt") == b"child"


def test_server_stops_and_frees_its_port():
    server = LocalHubServer().start()
    endpoint = server.endpoint
    assert httpx2.get(f"{endpoint}/api/models/a/b").status_code == 404
    server.stop()
    assert not server.running and server.wait_stopped(timeout=0)
    with pytest.raises(httpx2.ConnectError):
        httpx2.get(f"{endpoint}/api/models/a/b")
    server.stop()  # idempotent


def test_server_stops_by_itself_after_its_lifetime():
    server = LocalHubServer(max_lifetime_s=0.2).start()
    assert server.wait_stopped(timeout=30)
    assert not server.running


def test_server_rejects_malformed_commits(local_hub):
    HfApi().create_repo(f"{local_hub.user}/raw")
    url = f"{local_hub.endpoint}/api/models/{local_hub.user}/raw/commit/main"
    auth = {"Authorization": f"Bearer {local_hub.token}"}
    def ndjson(*items):
        return b"".join(json.dumps(item).encode() + b"\n" for item in items)

    def add(path, content=""):
        return {"key": "file", "value": {"path": path, "content": content, "encoding": "base64"}}

    header = {"key": "header", "value": {"summary": "s"}}
    bad_bodies = {
        "not json": b"{oops\n",
        "no header": ndjson(add("a")),
        "escaping path": ndjson(header, add("../a")),
        "absolute path": ndjson(header, add("/etc/a")),
        "lfs file": ndjson(header, {"key": "lfsFile", "value": {"path": "a", "oid": "0" * 64, "algo": "sha256"}}),
        "bad base64": ndjson(header, add("a", "@@@")),
    }
    for reason, body in bad_bodies.items():
        response = httpx2.post(url, content=body, headers=auth)
        assert response.status_code == 400, reason
        assert response.json()["error"]

    missing = httpx2.post(url, content=ndjson(header, {"key": "deletedFile", "value": {"path": "nope"}}), headers=auth)
    assert missing.status_code == 404 and missing.headers["X-Error-Code"] == "EntryNotFound"
    stale = {"key": "header", "value": {"summary": "s", "parentCommit": "0" * 40}}
    assert httpx2.post(url, content=ndjson(stale), headers=auth).status_code == 412
    assert httpx2.post(url, content=ndjson(header)).status_code == 401  # no token
    assert len(local_hub.server.repo(f"{local_hub.user}/raw").commits) == 1  # only the initial commit


def test_dataset_repos_use_their_own_url_prefix(local_hub):
    api = HfApi()
    repo_id = f"{local_hub.user}/tiny-data"
    url = api.create_repo(repo_id, repo_type="dataset")
    assert url.repo_type == "dataset" and "/datasets/" in url
    api.upload_file(path_or_fileobj=b"a,b\n1,2\n", path_in_repo="data.csv", repo_id=repo_id, repo_type="dataset")
    assert api.dataset_info(repo_id).sha == local_hub.server.repo(repo_id, "dataset").branches["main"]
    path = hf_hub_download(repo_id, "data.csv", repo_type="dataset")
    assert Path(path).read_bytes() == b"a,b\n1,2\n"
    assert local_hub.server.count("resolve", path_contains=f"/datasets/{repo_id}/") >= 1
    with pytest.raises(RepositoryNotFoundError):  # same id, other type
        api.model_info(repo_id)
