"""Loading the models for the app: the Hub asked once, a failure remembered, a message that says
how to fix it, and the weights fetched in the background at start-up.

huggingface_hub retries a failed download five times with growing pauses, about 23 s a file:
right for a flaky connection, wrong for a machine with none, where every request would wait
45 s and then fail the same way. So before the app reaches for the Hub it asks it once, with a
short timeout and no retries. A failure is remembered for ``REMEMBER_FAILURE_S``; meanwhile the
models load from the local cache only (huggingface_hub's offline mode), which succeeds at once
for cached files and fails at once for the rest, with a message naming the three ways out:
``HF_HUB_OFFLINE=1`` with cached weights, a local folder, or ``--weights random``.
"""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import TypeVar

from huggingface_hub import constants, get_session, try_to_load_from_cache

from sd_parts.weights import CheckpointLayout, WeightsError, fetch_files, weights_filename

ETAG_TIMEOUT_S = 5  # huggingface_hub's own: 10 s per metadata request, 60 s when it retries
PROBE_TIMEOUT_S = 4.0
REMEMBER_FAILURE_S = 120.0  # a fix (a cable, a proxy) is seen within two minutes
REMEMBER_SUCCESS_S = 60.0
FIXES = ("To fix: start with HF_HUB_OFFLINE=1 once the weights are cached; or give local files "
         "(--vae, --text-encoder, --unet folders, or --pipeline FILE.safetensors); or start with "
         "--weights random.")
Model = TypeVar("Model")


class ModelUnavailable(RuntimeError):
    """A model could not be loaded; the message says why and what to do, for the page."""


def split_fix(message: str) -> tuple[str, str]:
    """A failure's message as (what went wrong, "To fix: ..."), the second empty if it has none."""
    reason, marker, fix = message.partition("To fix:")
    return reason.strip(), f"{marker} {fix.strip()}" if marker else ""


def fixes(messages: Sequence[str]) -> str:
    """The distinct fixes of several failures, each once."""
    return " ".join(fix for fix in dict.fromkeys(split_fix(m)[1] for m in messages) if fix)


def with_one_fix(messages: Sequence[str]) -> str:
    """Several failures in one message, each distinct fix said once at its end: three VAEs that
    are not cached share one advice, which would otherwise be read three times."""
    return " ".join([*(split_fix(message)[0] for message in messages), fixes(messages)]).strip()


def configure_timeouts() -> None:
    """Shorter waits for the Hub's metadata requests, unless HF_HUB_ETAG_TIMEOUT says otherwise.

    huggingface_hub reads this setting at each call, so setting it before the first download
    is enough.
    """
    if "HF_HUB_ETAG_TIMEOUT" not in os.environ:
        constants.HF_HUB_ETAG_TIMEOUT = ETAG_TIMEOUT_S


def is_local(source: str) -> bool:
    """A folder or a file on this machine, not a Hub repo id."""
    return os.path.exists(source)


class HubAccess:
    """Whether the Hugging Face Hub answered lately: one probe, its answer remembered for a while.

    ``probe`` returns None when the Hub answers, else one line saying what went wrong.
    """

    def __init__(
        self,
        probe: Callable[[], str | None] | None = None,
        remember_failure_s: float = REMEMBER_FAILURE_S,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._probe = probe or probe_hub
        self._remember_failure_s = remember_failure_s
        self._clock = clock
        self._lock = threading.Lock()
        self._failure: str | None = None
        self._until = float("-inf")
        self.probes = 0  # how many times the Hub was asked, for tests and the console

    def failure(self) -> str | None:
        """None when the Hub answered (or offline mode means it is never asked), else why not."""
        if constants.HF_HUB_OFFLINE:
            return None  # huggingface_hub uses the cache only and says so itself
        with self._lock:
            if self._clock() < self._until:
                return self._failure
            self.probes += 1
            self._failure = self._probe()
            keep = REMEMBER_SUCCESS_S if self._failure is None else self._remember_failure_s
            self._until = self._clock() + keep
            return self._failure

    def retry_in(self) -> float:
        """Seconds until the Hub is asked again."""
        return max(0.0, self._until - self._clock())

    def load(self, source: str, load: Callable[[], Model], what: str) -> Model:
        """``load()``, with the Hub asked first; every failure becomes ``ModelUnavailable``.

        While the Hub is known to be unreachable, ``load`` runs against the local cache only, so
        cached weights still load at once.
        """
        failure = None if is_local(source) else self.failure()
        try:
            if failure is None:
                return load()
            with cache_only():
                return load()
        except WeightsError as exc:
            if failure is None:
                raise ModelUnavailable(f"Could not load {what}. {exc}") from None
            raise ModelUnavailable(
                f"Could not load {what}: the Hugging Face Hub did not answer ({failure}) and "
                f"{source!r} is not in the local cache. The app asks the Hub again in "
                f"{self.retry_in():.0f} s. {FIXES}"
            ) from None


_offline_lock = threading.Lock()


@contextmanager
def cache_only() -> Iterator[None]:
    """huggingface_hub's offline mode for the duration: files come from the local cache or fail."""
    with _offline_lock:
        before = constants.HF_HUB_OFFLINE
        constants.HF_HUB_OFFLINE = True
        try:
            yield
        finally:
            constants.HF_HUB_OFFLINE = before


def probe_hub(timeout_s: float = PROBE_TIMEOUT_S) -> str | None:
    """One request to the Hub's front page, no retries: None if it answers, else what failed."""
    try:
        response = get_session().head(constants.ENDPOINT, timeout=timeout_s)
    except Exception as exc:  # noqa: BLE001 - whatever stops the request, the Hub did not answer
        return f"{type(exc).__name__}: {exc}"
    if response.status_code >= 500:
        return f"{constants.ENDPOINT} answered HTTP {response.status_code}"
    return None


# ---------------------------------------------------------------------------------------------
# Fetching the weights in the background at start-up


@dataclass(frozen=True)
class Download:
    """The files of one model the app will need: config and weights, in the Hub's layout."""

    what: str  # for the console, e.g. "the VAE (SD v1.5 VAE)"
    source: str
    subfolder: str | None
    layout: CheckpointLayout
    variant: str | None = None  # "fp16": the half-size file, where the repo has one

    def filenames(self) -> list[str]:
        return ["config.json", weights_filename(self.layout.weights_stem, self.variant)]

    def cached(self) -> bool:
        """Whether every file is in the local cache already, in any folder ``fetch_files`` tries."""
        if is_local(self.source):
            return True
        folders = ["", self.layout.default_subfolder]
        if self.subfolder is not None:
            folders = [self.subfolder]
        return any(
            all(isinstance(try_to_load_from_cache(self.source, f"{folder}/{name}".lstrip("/")),
                           str) for name in self.filenames())
            for folder in folders
        )

    def fetch(self) -> None:
        fetch_files(self.source, self.filenames(), self.subfolder, self.layout.default_subfolder)


def start_prefetch(
    downloads: Sequence[Download], hub: HubAccess, say: Callable[[str], None] = print
) -> threading.Thread | None:
    """Fetch what is not cached yet in a background thread, with progress in the console.

    huggingface_hub draws a progress bar per file; the first request then finds the files in the
    cache (or waits for the file being written, under huggingface_hub's own lock). Nothing
    starts in offline mode or when everything is cached. When the Hub does not answer, that is
    said once here and remembered for the first requests.
    """
    if constants.HF_HUB_OFFLINE:
        return None
    missing = [d for d in downloads if not d.cached()]
    if not missing:
        return None
    whats = [d.what for d in missing]
    names = ", ".join(whats[:-1]) + f" and {whats[-1]}" if len(whats) > 1 else whats[0]

    def fetch_all() -> None:
        failure = hub.failure()
        if failure is not None:
            say(f"The Hugging Face Hub did not answer ({failure}), so {names} cannot be fetched. "
                f"The app runs: tokens are shown, model views say what failed. {FIXES}")
            return
        for download in missing:
            say(f"Fetching {download.what} from {download.source} in the background...")
            start = time.perf_counter()
            try:
                download.fetch()
            except WeightsError as exc:  # the first request will say so again, on the page
                say(f"Could not fetch {download.what}: {exc}")
                return
            say(f"Fetched {download.what} in {time.perf_counter() - start:.0f} s.")

    thread = threading.Thread(target=fetch_all, name="prefetch", daemon=True)
    thread.start()
    return thread
