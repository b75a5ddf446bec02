"""``pacs certs``: a local CA and certificates for DICOM TLS and HTTPS.
Registered by :func:`register` from pacs.cli.

    pacs certs init-ca --out /etc/pacs/ca [--name "BVDK CA"]
    pacs certs issue pacs --ca /etc/pacs/ca --out /etc/pacs/tls --dns pacs.bvdk.local --ip 10.0.0.5
    pacs certs issue CT_ROOM1 --ca /etc/pacs/ca --out ./ct1 --client
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any


def cmd_certs(args: argparse.Namespace) -> int:
    """Run ``pacs certs init-ca|issue``; 0 written, 2 bad input (nothing written)."""
    from .console import fail

    from . import certs

    try:
        if args.certs_command == "init-ca":
            result = certs.init_ca(args.out, args.name, days=args.days)
        else:
            result = certs.issue(args.name, args.ca, args.out, dns=args.dns, ips=args.ip,
                                 client=args.client, days=args.days, force=args.force)
    except certs.CertError as exc:
        fail(exc)
        return 2
    if args.json:
        print(json.dumps(result.as_dict()))
        return 0
    # Plain print: paths and commands must stay whole lines to copy (rich would wrap them).
    print(f"{result.kind} certificate {result.subject}, valid until {result.not_after[:10]}")
    print(f"  sha256 {result.sha256_fingerprint}")
    for name in ("dns", "ip"):
        if getattr(result, name):
            print(f"  {name}: {', '.join(getattr(result, name))}")
    for path in result.files:
        print(f"  wrote {path}")
    if result.kind == "server":
        print(f"  serve with: --tls-cert {result.cert} --tls-key {result.key} --tls-ca {result.ca}")
    elif result.kind == "client":
        print(f"  DCMTK: storescu +tls {result.key} {result.cert} +cf {result.ca} ...")
    return 0


def register(sub: Any, common: Callable[..., None]) -> None:
    """Add ``pacs certs`` to the `pacs` parser."""
    p = sub.add_parser("certs", help="a local CA and TLS certificates for the hospital network")
    c_sub = p.add_subparsers(dest="certs_command", required=True)

    q = c_sub.add_parser("init-ca", help="create a CA: DIR/ca.pem (give to every peer) and DIR/ca.key (keep secret)")
    common(q, json_flag=True)
    q.add_argument("--out", type=Path, required=True, help="directory for ca.pem and ca.key (created 0700)")
    q.add_argument("--name", default="filmless-pacs local CA", help="the CA's common name")
    q.add_argument("--days", type=int, default=3650, help="validity (default 10 years)")

    q = c_sub.add_parser("issue", help="issue NAME.pem and NAME.key signed by the CA")
    common(q, json_flag=True)
    q.add_argument("name", help="common name and file name: this host, or a modality's AE title")
    q.add_argument("--ca", type=Path, required=True, help="the CA directory (from init-ca)")
    q.add_argument("--out", type=Path, required=True, help="directory for NAME.pem and NAME.key")
    q.add_argument("--dns", action="append", help="a DNS name peers dial (repeatable)")
    q.add_argument("--ip", action="append", help="an IP address peers dial (repeatable)")
    q.add_argument("--client", action="store_true",
                   help="a client certificate (a modality, for mutual TLS) instead of a server one")
    q.add_argument("--days", type=int, default=825, help="validity (default 825 days, capped by the CA's)")
    q.add_argument("--force", action="store_true",
                   help="replace an existing NAME.pem and NAME.key (renewal; never the CA's files)")
    p.set_defaults(func=cmd_certs)
