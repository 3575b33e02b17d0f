import os

# Tests never reach the Hub; keep the libraries from trying.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import sys  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402

from hub_server import LocalHub, LocalHubServer  # noqa: E402

# One thread: tests are small, and several processes (multi-process tests, parallel runs) share 2 cores;
# oversubscribed OpenMP threads make small convolutions orders of magnitude slower.
torch.set_num_threads(1)

# Module-level names that libraries copy from huggingface_hub.constants (or HF_ENDPOINT) at import time.
_ENDPOINT_COPIES = ("ENDPOINT", "HF_ENDPOINT", "HUGGINGFACE_CO_URL_TEMPLATE", "HUB_DATASETS_URL")
_OFFLINE_COPIES = ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE")


@pytest.fixture
def local_hub(tmp_path, monkeypatch):
    """A Hugging Face Hub-protocol server on 127.0.0.1 that the real clients in this process talk to.

    Yields a ``hub_server.LocalHub`` with:

    * ``endpoint``: the server's base URL (``http://127.0.0.1:PORT``);
    * ``token``: the fake token the server accepts (also exported as ``HF_TOKEN``, so calls that pass no
      token are authenticated, like a logged-in user);
    * ``user``: the namespace that token owns (``create_repo("name")`` lands in ``f"{user}/name"``);
    * ``server``: the ``LocalHubServer``: ``server.repo(repo_id)`` (branches, tags, every ``Commit`` with its
      full file snapshot), ``server.file(repo_id, path, revision)``, ``server.requests`` /
      ``server.count(route=..., method=...)`` for what the clients sent;
    * ``home`` / ``cache_dir``: the fresh ``HF_HOME`` / ``HF_HUB_CACHE`` (under ``tmp_path``) used by downloads.

    In this process huggingface_hub has already read ``HF_ENDPOINT`` at import, so the fixture redirects
    it for the duration of the test: ``huggingface_hub.constants.ENDPOINT`` and
    ``HUGGINGFACE_CO_URL_TEMPLATE``, the module-level ``HfApi`` behind ``huggingface_hub.model_info`` /
    ``create_repo`` / ..., copies of those constants in other loaded modules, transformers' cached
    ``HfApi``, offline mode (switched off), the cache and token paths. ``HfApi()``, ``hf_hub_download``,
    ``snapshot_download``, timm's ``hf-hub:`` and transformers' ``from_pretrained`` / ``push_to_hub`` then
    use the server without being told about it. Everything is restored after the test and the server is
    stopped (it also stops by itself after 15 minutes). The test fails if the server hit an internal error.

    Subprocesses: a child process reads ``HF_ENDPOINT`` at its own import, so it targets the server when its
    environment says so. The fixture exports ``HF_ENDPOINT``, ``HF_TOKEN``, ``HF_HOME``, ``HF_HUB_CACHE`` and
    ``HF_HUB_OFFLINE=0`` with ``monkeypatch.setenv``, so ``subprocess.run([...])`` inherits them; when you
    build an environment yourself, start from ``local_hub.subprocess_env()`` (or ``subprocess_env(base)``).
    The server lives in the test process: the child must finish before the test returns.
    """
    from huggingface_hub import constants
    from huggingface_hub import hf_api as hf_api_module
    from huggingface_hub.utils import _http

    server = LocalHubServer().start()
    try:
        endpoint = server.endpoint
        home = tmp_path / "hf_home"
        cache_dir = home / "hub"
        hub = LocalHub(server=server, endpoint=endpoint, token=server.token, user=server.user, home=home,
                       cache_dir=cache_dir)

        for name in ("TRANSFORMERS_OFFLINE", "HF_DATASETS_OFFLINE", "HUGGING_FACE_HUB_TOKEN", "HF_TOKEN_PATH",
                     "HUGGINGFACE_HUB_CACHE", "HF_ASSETS_CACHE", "HF_XET_CACHE", "HF_OIDC_RESOURCE",
                     "HF_OIDC_ID_TOKEN", "HUGGINGFACE_CO_STAGING"):
            monkeypatch.delenv(name, raising=False)
        for name, value in hub.subprocess_env({}).items():
            monkeypatch.setenv(name, value)

        old_endpoint = constants.ENDPOINT
        monkeypatch.setattr(constants, "ENDPOINT", endpoint)
        url_template = endpoint + "/{repo_id}/resolve/{revision}/{filename}"
        monkeypatch.setattr(constants, "HUGGINGFACE_CO_URL_TEMPLATE", url_template)
        monkeypatch.setattr(constants, "HF_URL_HOSTS", constants.HF_URL_HOSTS | {"127.0.0.1"})
        old_offline = constants.HF_HUB_OFFLINE
        monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
        old_cache = constants.HF_HUB_CACHE
        for name, value in {
            "HF_HOME": home,
            "HF_HUB_CACHE": cache_dir,
            "HUGGINGFACE_HUB_CACHE": cache_dir,
            "HF_ASSETS_CACHE": home / "assets",
            "HUGGINGFACE_ASSETS_CACHE": home / "assets",
            "HF_XET_CACHE": home / "xet",
            "HF_TOKEN_PATH": home / "token",
            "HF_STORED_TOKENS_PATH": home / "stored_tokens",
        }.items():
            if hasattr(constants, name):
                monkeypatch.setattr(constants, name, str(value))

        # Copies made at import time by other modules (e.g. `from .constants import ENDPOINT`).
        modules_before = set(sys.modules)
        for module in list(sys.modules.values()):
            namespace = getattr(module, "__dict__", None)
            if module is constants or not isinstance(namespace, dict):
                continue
            for name in _ENDPOINT_COPIES:
                value = namespace.get(name)
                if isinstance(value, str) and value.startswith(old_endpoint):
                    monkeypatch.setattr(module, name, endpoint + value[len(old_endpoint):])
            for name in _OFFLINE_COPIES:
                if namespace.get(name) is True:
                    monkeypatch.setattr(module, name, False)
            if namespace.get("HF_HUB_CACHE") == old_cache:
                monkeypatch.setattr(module, "HF_HUB_CACHE", str(cache_dir))

        # HfApi instances created at import keep the endpoint they saw then.
        monkeypatch.setattr(hf_api_module.api, "endpoint", endpoint)
        transformers_hub = sys.modules.get("transformers.utils.hub")
        if transformers_hub is not None and "_hf_api" in vars(transformers_hub):
            monkeypatch.setattr(transformers_hub, "_hf_api", None)

        _http.close_session()  # no pooled connection from an earlier test may be reused
        yield hub
        _forget_copies_made_during_test(modules_before, endpoint, old_endpoint, str(cache_dir), old_cache, old_offline)
    finally:
        server.stop()
        _http.close_session()
    assert not server.errors, "local hub server hit internal errors:\n" + "\n".join(server.errors)


def _forget_copies_made_during_test(modules_before, endpoint, old_endpoint, cache_dir, old_cache, old_offline):
    """Modules first imported during the test copied the patched values; monkeypatch cannot undo those.

    Point them back at what the rest of the session uses, so no later test talks to a stopped server or
    runs online by accident.
    """
    for name in set(sys.modules) - modules_before:
        namespace = getattr(sys.modules.get(name), "__dict__", None)
        if not isinstance(namespace, dict):
            continue
        for attr in _ENDPOINT_COPIES:
            value = namespace.get(attr)
            if isinstance(value, str) and value.startswith(endpoint):
                namespace[attr] = old_endpoint + value[len(endpoint):]
        for attr in _OFFLINE_COPIES:
            if namespace.get(attr) is False and old_offline:
                namespace[attr] = True
        if namespace.get("HF_HUB_CACHE") == cache_dir:
            namespace["HF_HUB_CACHE"] = old_cache
    # transformers keeps one HfApi, created on first use with the endpoint of that moment.
    transformers_hub = sys.modules.get("transformers.utils.hub")
    cached_api = getattr(transformers_hub, "_hf_api", None)
    if cached_api is not None and getattr(cached_api, "endpoint", None) == endpoint:
        transformers_hub._hf_api = None
