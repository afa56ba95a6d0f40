"""Running the nnsight recording on NDIF: API key, pre-flight checks, error translation, registration.

`attnflow.trace(model, prompts, remote=True)` ships each batch's `model.trace`
block to NDIF, which runs it next to the hosted weights and sends back only what
the block saved: the reduced patterns.  What runs there is torch and einops
(`tracers/reduce.py`, which `register()` ships by value with every request, so
the server needs no attnflow).  `remote=` takes

    False          a local run
    True           NDIF at $NDIF_HOST or nnsight's CONFIG.API.HOST (https://api.ndif.us)
    "https://..."  another NDIF-compatible host, e.g. a self-hosted `ndif` server
    "http://..."   only to a loopback address (127.0.0.0/8, ::1, localhost): the API key
                   travels in the request headers and the reply is unpickled
    "local"        nnsight's serialisation round trip, run here: what NDIF would run, without a server

Before the first request to a host, `trace_kwargs` checks what would otherwise
fail late or cryptically, each with an `attnflow.errors.RemoteError` saying what
to do: a model the host does not serve (its `/status`), and an nnsight whose
major.minor differs from the server's (its `/env`).  A model counts as served
when `/status` lists it at any level: HOT (loaded), WARM (parked in CPU memory)
or COLD (weights in the server's cache, loaded on the first request, which waits
for the load).  The API key ($NDIF_API_KEY, else nnsight's config) is sent when
there is one; a server without auth (an `ndif` without Postgres) needs none, so
a missing key is reported only when the server asks for one (401).
`translate_errors` turns what the server or the network says afterwards (no key,
a rejected key, a refused client version, a failed job) into the same one-line
RemoteError.

    >>> kwargs = trace_kwargs(model, True)          # {"backend": RemoteBackend(...)}  # doctest: +SKIP
    >>> with translate_errors(kwargs):              # doctest: +SKIP
    ...     with model.trace(input_ids=ids, **kwargs):
    ...         saved = something.save()

(Skipped as a doctest: it needs an NDIF server; tests/test_remote.py runs it against the mock.)
"""

from __future__ import annotations

import ipaddress
import json
import os
import sys
from contextlib import contextmanager
from typing import Any, Iterator
from urllib.parse import urlsplit

from attnflow.errors import BadArgumentError, RemoteError

KEY_HELP = "set NDIF_API_KEY (or run `nnsight login`) with a key from https://login.ndif.us"
_CHECKED: set[tuple[str, str]] = set()  # (host, model key) pairs that passed the pre-flight checks


def register() -> None:
    """Ship `attnflow.tracers.reduce` by value with every request, so NDIF runs it without attnflow installed."""
    import nnsight

    from attnflow.tracers import reduce

    nnsight.register(reduce)


def check_remote(remote: Any) -> Any:
    """False | True | "local" | an http(s) host URL, else BadArgumentError."""
    if remote is None or remote is False:
        return False
    if remote is True or remote == "local":
        return remote
    if isinstance(remote, str) and remote.startswith(("http://", "https://")):
        return check_scheme(remote.rstrip("/"), f"remote={remote!r}")
    raise BadArgumentError(
        f"remote={remote!r}; use False, True (NDIF), 'local' (nnsight's serialisation round trip) or an http(s) host URL"
    )


def check_scheme(url: str, what: str) -> str:
    """`url` if it is https, or http to a loopback address; else BadArgumentError (the key would travel in clear).

    >>> check_scheme("http://127.0.0.1:8001", "remote")
    'http://127.0.0.1:8001'
    """
    parts = urlsplit(url)
    if parts.scheme == "https" or (parts.scheme == "http" and _loopback(parts.hostname or "")):
        return url
    raise BadArgumentError(
        f"{what}: plain http to {parts.hostname or url!r} would send the API key in clear and unpickle an "
        "unauthenticated reply; use https://, or http:// only to 127.0.0.1, ::1 or localhost"
    )


def _loopback(hostname: str) -> bool:
    if hostname == "localhost":
        return True
    try:
        return ipaddress.ip_address(hostname).is_loopback
    except ValueError:
        return False


def host(remote: Any) -> str:
    """The NDIF host a remote run talks to."""
    if isinstance(remote, str) and remote != "local":
        return remote
    from nnsight import CONFIG

    url = (os.environ.get("NDIF_HOST") or CONFIG.API.HOST).rstrip("/")
    return check_scheme(url, "NDIF_HOST" if os.environ.get("NDIF_HOST") else "nnsight's CONFIG.API.HOST")


def api_key() -> str:
    """$NDIF_API_KEY, else the key in nnsight's config, else "" (sent without a key: the server decides)."""
    from nnsight import CONFIG

    return os.environ.get("NDIF_API_KEY") or CONFIG.API.APIKEY or ""


def model_key(model: Any) -> str:
    """nnsight's remote key of `model` ("import.path.Class:{json}"), or RemoteError for a model NDIF cannot name."""
    if not hasattr(model, "to_model_key"):
        raise RemoteError(
            f"a {type(model).__name__} cannot run on NDIF; load the model by its hub id "
            "(af.load('org/name') or nnsight.TransformersModel('org/name'))"
        )
    try:
        return model.to_model_key()
    except Exception as err:  # a local path or an id the hub does not know
        name = getattr(model, "repo_id", None) or type(model).__name__
        raise RemoteError(
            f"NDIF cannot name the model {name!r} ({_first_line(err)}); NDIF runs hub models: load one by its hub id"
        ) from err


def repo_id(key: str) -> str:
    """The hub id inside a model key."""
    try:
        return json.loads(key.split(":", 1)[1])["repo_id"]
    except (IndexError, ValueError, KeyError, TypeError):
        return key


def trace_kwargs(model: Any, remote: Any) -> dict:
    """Keyword arguments for `model.trace(...)` / `model.generate(...)` that run the block where `remote` says.

    {} for a local run; {"remote": "local"} for the round trip; for NDIF a
    RemoteBackend, after the pre-flight checks (cached per host and model).
    """
    remote = check_remote(remote)
    if not remote:
        return {}
    register()
    if remote == "local":
        if not hasattr(model, "_remoteable_persistent_objects"):
            raise RemoteError(f"remote='local' needs an nnsight TransformersModel (af.load), not a {type(model).__name__}")
        return {"remote": "local"}
    from nnsight.intervention.backends.remote import RemoteBackend

    url, key = host(remote), api_key()
    mkey = model_key(model)
    if (url, mkey) not in _CHECKED:
        check_versions(url)
        check_hosted(url, mkey)
        _CHECKED.add((url, mkey))
    return {"backend": RemoteBackend(mkey, host=url, api_key=key, env=model._remoteable_get_env())}


def generate(model: Any, input_ids: Any, attention_mask: Any, *, remote: Any, **generate_kwargs: Any) -> Any:
    """Token ids [batch, seq + new] of `model.generate(...)` run where `remote` says (the weights stay there).

    `generate_kwargs` are those of HF `generate` (max_new_tokens, do_sample, pad_token_id, ...),
    so a remote run generates exactly what a local `hf.generate` call with them would.
    """
    import torch

    kwargs = trace_kwargs(model, remote)
    with torch.no_grad(), translate_errors(kwargs):
        with model.generate(input_ids=input_ids, attention_mask=attention_mask, **generate_kwargs, **kwargs) as tracer:
            ids = tracer.result.save()
    return ids.detach().cpu()


def load(name: str) -> Any:
    """An nnsight TransformersModel of hub id `name` for remote runs: config and tokenizer only, no weights."""
    import nnsight
    from transformers import AutoTokenizer

    try:  # a causal LM: the task is known, so nothing asks the hub for it
        return nnsight.TransformersModel(name, task="text-generation", tokenizer=AutoTokenizer.from_pretrained(name))
    except Exception as err:
        raise RemoteError(f"cannot open {name!r} for a remote run ({_first_line(err)}); pass a hub id like org/name") from err


# --- pre-flight checks ---------------------------------------------------------------------
def _get(url: str, path: str) -> Any:
    import httpx

    try:
        response = httpx.get(f"{url}{path}", timeout=httpx.Timeout(10.0, read=60.0))
    except httpx.HTTPError as err:
        raise RemoteError(f"cannot reach NDIF at {url} ({_first_line(err)}); check the network or NDIF_HOST") from err
    if response.status_code >= 400:
        raise RemoteError(f"NDIF at {url} answered {path} with {response.status_code} ({_detail(response)}); try again later")
    return response.json()


def check_hosted(url: str, key: str) -> None:
    """RemoteError unless the host's /status lists the model's hub id, at any level (HOT, WARM or COLD)."""
    deployments = (_get(url, "/status") or {}).get("deployments", {}) or {}
    wanted = repo_id(key)
    hosted = sorted({hosted_id(name, d) for name, d in deployments.items() if isinstance(d, dict)})
    if wanted not in hosted:
        listed = ", ".join(hosted[:10]) + (", ..." if len(hosted) > 10 else "") if hosted else "nothing right now"
        raise RemoteError(f"NDIF at {url} does not host {wanted!r} (it hosts {listed}); pick a model from nnsight.status()")


def hosted_id(name: str, entry: dict) -> str:
    """The hub id of one /status entry: its repo_id, else the one in its model_key or its name.

    NDIF names a replica "<replica>:ModelActor:<model key>" and reports repo_id
    from the model's config, which can be None; a COLD entry is named by its id.

    >>> hosted_id('0:ModelActor:m.TransformersModel:{"repo_id": "org/a"}', {"repo_id": None})
    'org/a'
    """
    if entry.get("repo_id"):
        return entry["repo_id"]
    return repo_id(entry.get("model_key") or name.split(":ModelActor:", 1)[-1])


def check_versions(url: str) -> None:
    """RemoteError when the host's nnsight differs from this one in major.minor (its /env); skipped if /env is absent."""
    import nnsight

    try:
        env = _get(url, "/env")
    except RemoteError as err:
        if "cannot reach" in str(err):
            raise
        return  # an older server without /env: its own version gate still answers
    theirs = str((env or {}).get("packages", {}).get("nnsight", "") or "")
    if theirs and _minor(theirs) != _minor(nnsight.__version__):
        raise RemoteError(
            f"NDIF at {url} runs nnsight {theirs} but this client has nnsight {nnsight.__version__}; "
            f"install the server's version (pip install 'nnsight=={theirs}') to run remotely"
        )


def _minor(version: str) -> tuple[str, ...]:
    return tuple(version.split(".")[:2])


# --- errors after sending -----------------------------------------------------------------------
@contextmanager
def translate_errors(kwargs: dict | None = None) -> Iterator[None]:
    """Turn nnsight's remote failures and network errors into one-line attnflow RemoteErrors."""
    if not kwargs:
        yield
        return
    backend = kwargs.get("backend")
    url = getattr(backend, "host", None) or "NDIF"
    key_sent = bool(getattr(backend, "api_key", ""))
    from nnsight.intervention.backends.remote import RemoteError as NnsightRemoteError

    try:
        yield
    except NnsightRemoteError as err:
        raise RemoteError(explain(str(err), url, key_sent)) from err
    except (ConnectionError, TimeoutError) as err:
        raise RemoteError(f"cannot reach NDIF at {url} ({_first_line(err)}); check the network or NDIF_HOST") from err
    except Exception as err:
        if type(err).__module__.split(".")[0] in ("httpx", "websocket", "httpcore"):
            raise RemoteError(f"cannot reach NDIF at {url} ({_first_line(err)}); check the network or NDIF_HOST") from err
        raise


def explain(message: str, url: str = "NDIF", key_sent: bool = True) -> str:
    """One line saying what a server's error message means and what to do (`key_sent`: was an API key sent)."""
    import nnsight

    detail = _last_line(message).removeprefix("Failed to send request: ")
    low = message.lower()
    if ("api key" in low or "401" in low) and not key_sent:
        return f"no NDIF API key: {KEY_HELP} (NDIF at {url} asks for one: {detail})"
    if "api key" in low or "401" in low:
        return f"NDIF at {url} rejected the API key ({detail}); {KEY_HELP}"
    if "version" in low and ("nnsight" in low or "python" in low) and ("minimum" in low or "incompatible" in low):
        py = ".".join(map(str, sys.version_info[:2]))
        return f"NDIF at {url} refused this client (nnsight {nnsight.__version__}, python {py}): {detail}"
    if any(s in low for s in ("not deployed", "not hosted", "model mismatch", "could not deploy", "provisioning model")):
        return f"NDIF at {url} does not serve this model ({detail}); pick a model from nnsight.status()"
    if "no module named 'attnflow" in low:
        return f"NDIF at {url} has no attnflow and this request needed it ({detail}); this is an attnflow bug: please report it"
    return f"the run on NDIF at {url} failed: {detail}"


def _detail(response: Any) -> str:
    try:
        body = response.json()
        return str(body.get("detail", body) if isinstance(body, dict) else body)
    except ValueError:
        return response.text[:200] or response.reason_phrase


def _first_line(err: BaseException) -> str:
    text = str(err).strip() or type(err).__name__
    return text.splitlines()[0]


def _last_line(text: str) -> str:
    lines = [line.strip() for line in text.strip().splitlines() if line.strip()]
    return lines[-1] if lines else "no details"
