"""Which TCP ports a process tree listens on, read from /proc (Linux): tests assert they are all loopback."""

from __future__ import annotations

import ipaddress
import os

LOOPBACK = {ipaddress.ip_address("127.0.0.1"), ipaddress.ip_address("::1")}


def descendants(root: int) -> set[int]:
    """``root`` and every process below it."""
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                ppid = int(f.read().rsplit(")", 1)[1].split()[1])
        except (OSError, IndexError, ValueError):
            continue
        children.setdefault(ppid, []).append(int(entry))
    found, todo = set(), [root]
    while todo:
        pid = todo.pop()
        found.add(pid)
        todo += children.get(pid, [])
    return found


def _address(hex_ip: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address:
    raw = bytes.fromhex(hex_ip)
    if len(raw) == 4:
        return ipaddress.IPv4Address(raw[::-1])
    address = ipaddress.IPv6Address(b"".join(raw[i : i + 4][::-1] for i in range(0, 16, 4)))
    return address.ipv4_mapped or address


def listeners(pids: set[int]) -> set[tuple[str, int, int]]:
    """(address, port, pid) of every listening TCP socket the processes ``pids`` hold."""
    owner: dict[str, int] = {}
    for pid in pids:
        try:
            fds = os.listdir(f"/proc/{pid}/fd")
        except OSError:
            continue
        for fd in fds:
            try:
                link = os.readlink(f"/proc/{pid}/fd/{fd}")
            except OSError:
                continue
            if link.startswith("socket:["):
                owner[link[len("socket:[") : -1]] = pid
    found = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        with open(table) as f:
            next(f)
            for line in f:
                fields = line.split()
                local, state, inode = fields[1], fields[3], fields[9]
                if state == "0A" and inode in owner:  # 0A: LISTEN
                    hex_ip, hex_port = local.split(":")
                    found.add((str(_address(hex_ip)), int(hex_port, 16), owner[inode]))
    return found


def external_listeners(root: int) -> set[tuple[str, int, int]]:
    """The listening sockets of ``root``'s process tree that are not on a loopback address.

    A tree that holds no listening socket at all is an error, not an empty answer: it means the
    processes were missed (or not started yet), and nothing would have been checked."""
    found = listeners(descendants(root))
    assert found, f"process {root} and its children hold no listening socket: nothing to check"
    return {entry for entry in found if ipaddress.ip_address(entry[0]) not in LOOPBACK}
