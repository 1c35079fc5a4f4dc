"""The warning every page shows when the app listens beyond this machine (no login protects it).

`streamlit run app.py` reads .streamlit/config.toml, which binds the server to localhost. Anything else
(`--server.address 0.0.0.0`, a LAN address, or no address at all: then Streamlit listens on every
interface) makes the app reachable by whoever can reach the port, and nothing asks them who they are.
"""
from __future__ import annotations

import ipaddress
import socket
from functools import lru_cache

import streamlit as st
from streamlit import config

LOOPBACK_NAMES = {"localhost", "localhost.localdomain", "ip6-localhost", "ip6-loopback"}
UNIX_SOCKET_PREFIX = "unix://"  # Streamlit's: a socket file on this machine


def _is_loopback_ip(text: str) -> bool | None:
    try:
        return ipaddress.ip_address(text.split("%", 1)[0]).is_loopback
    except ValueError:
        return None


@lru_cache(maxsize=32)
def _resolves_to_loopback(host: str) -> bool:
    try:
        addresses = {info[4][0] for info in socket.getaddrinfo(host, None)}
    except (OSError, UnicodeError):
        return False
    return bool(addresses) and all(_is_loopback_ip(a) for a in addresses)


def is_loopback(address: str | None) -> bool:
    """Whether a server bound to `address` is reachable from this machine only."""
    if not address or not address.strip():
        return False  # unset: Streamlit listens on every interface
    address = address.strip()
    if address.startswith(UNIX_SOCKET_PREFIX):
        return True
    host = address.strip("[]").lower()
    if host in LOOPBACK_NAMES or host.endswith(".localhost"):
        return True
    ip = _is_loopback_ip(host)
    if ip is not None:
        return ip
    return _resolves_to_loopback(host)


def exposure_warning(address: str | None) -> str | None:
    """The banner text for a server bound to `address`, or None when only this machine can connect."""
    if is_loopback(address):
        return None
    if not address or address.strip() in ("0.0.0.0", "::", "[::]"):
        where = "on every network interface of this machine" + ("" if address else " (server.address is not set)")
    else:
        where = f"at {address.strip()}"
    return (f"**This app is reachable from the network** ({where}) and has **no login**: anyone who can reach "
            "this port can see every run, model card and prediction, upload images, start trainings that spend "
            "privacy budget, and delete runs. To keep it on this machine, start it with `streamlit run app.py` "
            "from the repository folder (its `.streamlit/config.toml` sets `server.address = \"localhost\"`), or "
            "pass `--server.address localhost`. Serve it to others only behind a login (a reverse proxy with "
            "authentication).")


def show_network_warning() -> None:
    text = exposure_warning(config.get_option("server.address"))
    if text:
        st.warning(text, icon="🌐")


def keep_app_navigation() -> None:
    """Make a page opened by its own URL on a fresh server run inside app.py's navigation.

    Streamlit treats an app with a `pages/` folder as an old-style multipage app until `st.navigation` has run
    once in the process: the first request, if it is a deep link (`/clinician`), runs that file directly, with
    every module of `pages/` listed as a page in the sidebar and without app.py's page config. Every page calls
    this first: in that case it switches the process to app.py's navigation and reruns, so the same URL now
    runs through app.py. Streamlit's flag is internal; if it moves, this does nothing (the old behaviour)."""
    try:
        from streamlit.runtime.pages_manager import PagesManager
    except ImportError:  # pragma: no cover - a Streamlit without the flag
        return
    # the rerun finds the page again by its URL; AppTest sessions have none (and re-enter the old mode on every
    # run, running page files directly), so they are left as they are
    if getattr(PagesManager, "uses_pages_directory", None) and getattr(st.context, "url", None):
        PagesManager.uses_pages_directory = False
        st.rerun()
