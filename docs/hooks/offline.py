"""mkdocs hook: the docs build must work without network, so any attempt to reach a remote host fails the build."""

from __future__ import annotations

import socket

LOCAL_HOSTS = {"localhost", "127.0.0.1", "::1", None}


def _refuse(host: object) -> None:
    raise OSError(f"The docs build tried to reach {host!r}; it must build offline (no remote themes or inventories).")


def on_startup(command: str, dirty: bool) -> None:
    getaddrinfo, connect = socket.getaddrinfo, socket.socket.connect

    def offline_getaddrinfo(host, *args, **kwargs):
        if host not in LOCAL_HOSTS:
            _refuse(host)
        return getaddrinfo(host, *args, **kwargs)

    def offline_connect(sock, address):
        if sock.family in (socket.AF_INET, socket.AF_INET6) and address[0] not in LOCAL_HOSTS:
            _refuse(address[0])
        return connect(sock, address)

    socket.getaddrinfo = offline_getaddrinfo
    socket.socket.connect = offline_connect
