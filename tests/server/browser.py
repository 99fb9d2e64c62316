"""What the browser tests share: ``jobledger serve`` in a subprocess, and Debian's Chromium."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import httpx
from playwright.sync_api import Browser, Page, sync_playwright

import jobledger
from jobledger.testing import wait_for

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--no-first-run",
]
TESTS = Path(__file__).resolve().parents[1]
#: The jobledger these tests import: the server subprocess must run the same one.
SOURCE = Path(jobledger.__file__).resolve().parents[1]


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class Server:
    """``jobledger serve`` in a subprocess; :attr:`url` once it answers /healthz."""

    def __init__(self, db_url: str, publish_log: Path, token: str | None = None) -> None:
        self.port = _free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        env = {
            **os.environ,
            "PYTHONPATH": os.pathsep.join([str(TESTS), str(SOURCE)]),
            "JOBLEDGER_TEST_PUBLISH_LOG": str(publish_log),
        }
        env.pop("JOBLEDGER_API_TOKEN", None)
        if token:
            env["JOBLEDGER_API_TOKEN"] = token
        self.process = subprocess.Popen(
            [
                sys.executable,
                "-c",
                "from jobledger.cli import main; main()",
                "serve",
                "--port",
                str(self.port),
                "--database-url",
                db_url,
                "--app",
                "server.recording",
                "--no-maintenance",
            ],
            env=env,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
        )
        wait_for("the supervisor to answer", self._up, 60)  # a loaded CI host is slow

    def _up(self) -> bool:
        if self.process.poll() is not None:
            err = self.process.stderr.read().decode() if self.process.stderr else ""
            raise AssertionError(f"server exited {self.process.returncode}: {err}")
        try:
            return httpx.get(self.url + "/healthz", timeout=1).status_code == 200
        except httpx.HTTPError:
            return False

    def stop(self) -> None:
        self.process.terminate()
        try:
            self.process.wait(timeout=15)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()


@contextmanager
def chromium() -> Iterator[Browser]:
    """Debian's Chromium (``/usr/bin/chromium``) driven by Playwright."""
    with sync_playwright() as pw:
        launched = pw.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS, headless=True)
        yield launched
        launched.close()


def shoot(page: Page, name: str) -> None:
    """Save a screenshot of the page as ``name``.png in ``$JOBLEDGER_SCREENSHOTS`` if set
    (the README's pictures: ``docs/screenshots``)."""
    folder = os.environ.get("JOBLEDGER_SCREENSHOTS")
    if folder:
        Path(folder).mkdir(parents=True, exist_ok=True)
        page.screenshot(path=str(Path(folder) / f"{name}.png"), full_page=True)
