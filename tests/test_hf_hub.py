"""Push a slim release to a Hub-protocol server on 127.0.0.1 (tests/hub_server.py) and pull it back."""
import pytest
import timm
import torch
from huggingface_hub import HfApi, ModelCard
from transformers import AutoImageProcessor, AutoModelForImageClassification

import ela_hf
import ela_hf.hub

MASK = [[False, True], [False, False], [False, True]]
FILES = {".gitattributes", "README.md", "config.json", "model.safetensors", "pruning_history.json", "d_t_per_window.png"}
HISTORY = {"windows": [{"epochs": [1, 3], "layers": [
    {"stage": 0, "block": 1, "d": 0.001, "mapped": 0.0, "skip": True},
    {"stage": 1, "block": 1, "d": 0.04, "mapped": 1.0, "skip": False},
    {"stage": 2, "block": 1, "d": 0.002, "mapped": 0.1, "skip": True},
]}]}


def _pruned(mask=MASK, seed=0):
    torch.manual_seed(seed)
    model = timm.create_model("ela_resnet20_cifar", num_classes=10)
    model.train()
    with torch.no_grad():
        model(torch.randn(4, 3, 32, 32))
    model.set_skip_mask(mask)
    return model.eval()


def test_push_then_pull_through_both_front_doors(local_hub):
    repo_id = f"{local_hub.user}/ela-r20-pruned"
    model = _pruned()
    images = torch.randn(2, 3, 32, 32)
    expected = model(images)

    commit = ela_hf.push_pruned_to_hub(model, repo_id, token=local_hub.token, pruning_history=HISTORY)
    repo = local_hub.server.repo(repo_id)
    history = repo.history("main")
    assert len(history) == 2, "repository creation, then exactly one commit with the whole release"
    assert commit.oid == history[0].sha
    assert set(HfApi().list_repo_files(repo_id)) == FILES

    via_hf = AutoModelForImageClassification.from_pretrained(repo_id).eval()
    via_timm = timm.create_model(f"hf-hub:{repo_id}", pretrained=True).eval()
    assert via_hf.skip_mask == MASK and via_hf.timm_model.layer1[1].attn is None
    assert via_timm.skip_mask == MASK and via_timm.layer3[1].attn is None
    torch.testing.assert_close(via_hf(images).logits, expected, rtol=0, atol=0)
    torch.testing.assert_close(via_timm(images), expected, rtol=0, atol=0)
    assert isinstance(AutoImageProcessor.from_pretrained(repo_id), ela_hf.ElaImageProcessor)
    card = ModelCard.load(repo_id)
    assert card.data.library_name == "timm" and f'"hf-hub:{repo_id}"' in card.text


def test_revisions_keep_each_release(local_hub):
    repo_id = f"{local_hub.user}/ela-r20-revisions"
    first = _pruned(mask=[[False, True], [False, False], [False, False]])
    ela_hf.push_pruned_to_hub(first, repo_id, token=local_hub.token, verify=False)
    first_sha = local_hub.server.repo(repo_id).history("main")[0].sha
    second = _pruned(mask=MASK, seed=1)
    ela_hf.push_pruned_to_hub(second, repo_id, token=local_hub.token, revision="pruned-more", verify=False)

    assert AutoModelForImageClassification.from_pretrained(repo_id).skip_mask == first.skip_mask
    assert AutoModelForImageClassification.from_pretrained(repo_id, revision="pruned-more").skip_mask == MASK
    # the commit sha of the first release still resolves after later pushes
    pinned = AutoModelForImageClassification.from_pretrained(repo_id, revision=first_sha)
    assert pinned.skip_mask == first.skip_mask
    assert timm.create_model(f"hf-hub:{repo_id}@pruned-more", pretrained=True).skip_mask == MASK


def test_failed_export_uploads_nothing(local_hub, monkeypatch):
    repo_id = f"{local_hub.user}/ela-r20-broken"

    def failing_card(*args, **kwargs):
        raise RuntimeError("disk full")

    monkeypatch.setattr(ela_hf.hub, "render_model_card", failing_card)
    with pytest.raises(RuntimeError, match="disk full"):
        ela_hf.push_pruned_to_hub(_pruned(), repo_id, token=local_hub.token, verify=False)
    assert local_hub.server.count(method="POST", path_contains="/commit/") == 0
    assert not HfApi().repo_exists(repo_id)


def test_the_next_push_deletes_the_temporary_folder_of_a_killed_one(local_hub, tmp_path, monkeypatch):
    """A push killed mid-upload left its whole release (weights included) in the temp folder for good."""
    import os
    import subprocess
    import sys
    import tempfile
    import textwrap

    temp = tmp_path / "tmp"
    temp.mkdir()
    script = textwrap.dedent(f"""
        import os, timm, ela_hf, huggingface_hub
        huggingface_hub.HfApi.upload_folder = lambda *a, **k: os._exit(3)
        model = timm.create_model("ela_resnet20_cifar", num_classes=10)
        ela_hf.push_pruned_to_hub(model, "{local_hub.user}/ela-r20-killed", token={local_hub.token!r}, verify=False)
    """)
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300,
                          env=dict(os.environ, TMPDIR=str(temp)))
    assert proc.returncode == 3, proc.stderr
    left = [p.name for p in temp.iterdir()]
    assert len(left) == 1 and left[0].startswith(f"ela_hf-push-{ela_hf.hf.modeling_ela._host_tag()}-")
    assert (temp / left[0] / "release" / "model.safetensors").is_file()
    running = temp / f"ela_hf-push-{ela_hf.hf.modeling_ela._host_tag()}-{os.getpid()}-abcd1234"  # this process: alive
    running.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(temp))
    ela_hf.push_pruned_to_hub(_pruned(), f"{local_hub.user}/ela-r20-killed", token=local_hub.token, verify=False)
    assert [p.name for p in temp.iterdir()] == [running.name]


def test_a_release_replaces_the_previous_one_and_its_card_names_what_loads(local_hub):
    # pushed with a bare name: the card must name the full id the repository got
    ela_hf.push_pruned_to_hub(_pruned(), "ela-r20-bare", token=local_hub.token, pruning_history=HISTORY, verify=False)
    repo_id = f"{local_hub.user}/ela-r20-bare"
    assert set(HfApi().list_repo_files(repo_id)) == FILES
    card = ModelCard.load(repo_id).text
    assert f'"hf-hub:{repo_id}"' in card and f'from_pretrained("{repo_id}")' in card

    # an unpruned release without history: the earlier history and plot go, in the same single commit
    before = len(local_hub.server.repo(repo_id).history("main"))
    ela_hf.push_pruned_to_hub(_pruned(mask=[[False, False]] * 3), repo_id, token=local_hub.token, verify=False)
    assert len(local_hub.server.repo(repo_id).history("main")) == before + 1
    assert set(HfApi().list_repo_files(repo_id)) == FILES - {"pruning_history.json", "d_t_per_window.png"}
    assert AutoModelForImageClassification.from_pretrained(repo_id).skip_mask == [[False, False]] * 3

    # a branch: its card loads that branch, and the code in it works as written
    ela_hf.push_pruned_to_hub(_pruned(), repo_id, token=local_hub.token, revision="v2", verify=False)
    card = local_hub.server.file(repo_id, "README.md", "v2").decode()
    assert f'"hf-hub:{repo_id}@v2"' in card
    assert f'AutoModelForImageClassification.from_pretrained("{repo_id}", revision="v2")' in card
    assert f'pipeline("image-classification", model="{repo_id}", revision="v2")' in card
    assert timm.create_model(f"hf-hub:{repo_id}@v2", pretrained=True).skip_mask == MASK


def test_private_is_not_silently_dropped_for_an_existing_repository(local_hub):
    repo_id = f"{local_hub.user}/ela-r20-public"
    ela_hf.push_pruned_to_hub(_pruned(), repo_id, token=local_hub.token, verify=False)
    with pytest.warns(UserWarning, match="already exists and is public; private=True applies only"):
        ela_hf.push_pruned_to_hub(_pruned(seed=1), repo_id, token=local_hub.token, private=True, verify=False)
    fresh = f"{local_hub.user}/ela-r20-private"
    ela_hf.push_pruned_to_hub(_pruned(), fresh, token=local_hub.token, private=True, verify=False)
    assert HfApi().model_info(fresh).private


def test_a_release_over_a_sharded_push_to_hub_leaves_no_stale_weights(local_hub, tmp_path):
    repo_id = f"{local_hub.user}/ela-r20-sharded"
    model = ela_hf.ElaForImageClassification(ela_hf.ElaConfig(architecture="ela_resnet20_cifar", num_labels=10))
    model.save_pretrained(tmp_path / "sharded", max_shard_size="300KB")  # what push_to_hub(...) may upload
    api = HfApi(token=local_hub.token)
    api.create_repo(repo_id)
    api.upload_folder(repo_id=repo_id, folder_path=tmp_path / "sharded")
    assert any(f.startswith("model-00001-of-") for f in api.list_repo_files(repo_id))
    ela_hf.push_pruned_to_hub(_pruned(), repo_id, token=local_hub.token, verify=False)
    assert set(api.list_repo_files(repo_id)) == FILES - {"pruning_history.json", "d_t_per_window.png"}
    assert AutoModelForImageClassification.from_pretrained(repo_id).skip_mask == MASK


def test_a_commit_id_as_revision_is_refused_before_anything_is_pushed(local_hub):
    with pytest.raises(ValueError, match="is a commit id; a push goes to a branch"):
        ela_hf.push_pruned_to_hub(_pruned(), f"{local_hub.user}/ela-r20-sha", token=local_hub.token,
                                  revision="0123456789abcdef0123456789abcdef01234567", verify=False)
    assert not HfApi().repo_exists(f"{local_hub.user}/ela-r20-sha")


def test_a_truncated_weight_file_on_the_hub_is_a_clear_error(local_hub):
    repo_id = f"{local_hub.user}/ela-r20-truncated"
    ela_hf.push_pruned_to_hub(_pruned(), repo_id, token=local_hub.token, verify=False)
    weights = local_hub.server.file(repo_id, "model.safetensors", "main")
    HfApi(token=local_hub.token).upload_file(path_or_fileobj=weights[:100], path_in_repo="model.safetensors",
                                             repo_id=repo_id)
    with pytest.raises(ValueError, match=f"the weights of {repo_id} are corrupt or truncated"):
        AutoModelForImageClassification.from_pretrained(repo_id)
