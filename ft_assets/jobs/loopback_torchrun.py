"""`python -m ft_assets.jobs.loopback_torchrun TORCHRUN-ARGS`: torchrun on one machine, reachable from it only.

torchrun's rendezvous store (a c10d TCPStore the agent serves, which the ranks then use to find
each other) listens on every interface whatever address it is given (torch 2.x binds `::`), and
the ranks' gloo/NCCL sockets listen on the address the host name resolves to (or the interface
GLOO_SOCKET_IFNAME names). While a run is open, anyone who reaches the machine could join it as
a rank and send the others tensors. Here:

- this process binds 127.0.0.1 on a free port itself and hands that socket to the store
  (`TCPStore(master_listen_fd=...)`) of a static rendezvous on 127.0.0.1:<that port>
  (`--nnodes=1 --node-rank=0 --rdzv-backend=static --master-addr=127.0.0.1 --master-port=<port>`,
  added before TORCHRUN-ARGS, which name no rendezvous of their own);
- the ranks' gloo and NCCL sockets are put on the loopback interface (GLOO_SOCKET_IFNAME and
  NCCL_SOCKET_IFNAME, whatever they were: one machine needs no other).

Several machines cannot work this way: `defs.launchers.torchrun_command` runs torch's own
torchrun for them, on `master_addr`, which must be on a network only the training nodes reach.
"""

from __future__ import annotations

import os
import socket
import sys
from typing import Sequence


def loopback_interface() -> str:
    """The name of the interface that carries 127.0.0.1 (`lo` on Linux)."""
    import psutil

    for name, addrs in psutil.net_if_addrs().items():
        if any(a.family == socket.AF_INET and a.address.startswith("127.") for a in addrs):
            return name
    return "lo"


def _bound_listener() -> tuple[int, int]:
    """(descriptor, port) of a TCP socket listening on 127.0.0.1, for the store to serve on."""
    listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    listener.bind(("127.0.0.1", 0))
    listener.listen(128)
    port = listener.getsockname()[1]
    return listener.detach(), port  # the store owns the descriptor from here on


def serve_store_on(listen_fd: int) -> None:
    """Make torchrun's static rendezvous serve its store on `listen_fd` instead of binding `::`."""
    from torch.distributed import TCPStore
    from torch.distributed.elastic.rendezvous import static_tcp_rendezvous

    if getattr(static_tcp_rendezvous, "TCPStore", None) is not TCPStore:
        raise RuntimeError("this torch's static rendezvous does not create its store as torch 2.x does, so "
                           "ft_assets cannot keep a single-node torchrun run on loopback "
                           "(see ft_assets/jobs/loopback_torchrun.py)")

    def loopback_store(*args, **kwargs):
        is_master = kwargs.get("is_master", args[3] if len(args) > 3 else False)
        if is_master:
            kwargs["master_listen_fd"] = listen_fd
        return TCPStore(*args, **kwargs)

    static_tcp_rendezvous.TCPStore = loopback_store


def main(argv: Sequence[str]) -> None:
    from torch.distributed.run import main as torchrun

    listen_fd, port = _bound_listener()
    serve_store_on(listen_fd)
    interface = loopback_interface()
    os.environ["GLOO_SOCKET_IFNAME"] = interface  # the ranks inherit it
    os.environ["NCCL_SOCKET_IFNAME"] = interface
    torchrun(["--nnodes=1", "--node-rank=0", "--rdzv-backend=static", "--master-addr=127.0.0.1",
              f"--master-port={port}", *argv])


if __name__ == "__main__":
    main(sys.argv[1:])
