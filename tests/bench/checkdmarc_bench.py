#!/usr/bin/env python3
"""checkdmarc's SPF and DMARC checks (all it checks of ours) over the bench
domains, one after the other as `checkdmarc.check_domains` runs them, against
the bench's knot. Prints `key value` lines; exits 1 when any domain's SPF or
DMARC is not valid (the zone is built so that all are: anything else means
the run is broken).

    checkdmarc_bench.py DOMAINS_FILE PORT
"""

import sys
import time

import checkdmarc.dmarc
import checkdmarc.spf
import dns.nameserver


def main() -> int:
    domains_file, port = sys.argv[1], int(sys.argv[2])
    with open(domains_file, encoding="ascii") as f:
        domains = [line.strip() for line in f if line.strip()]
    nameservers = [dns.nameserver.Do53Nameserver("127.0.0.1", port)]
    failures = []
    started = time.perf_counter()
    for domain in domains:
        spf = checkdmarc.spf.check_spf(domain, nameservers=nameservers, timeout=2.0)
        dmarc = checkdmarc.dmarc.check_dmarc(domain, nameservers=nameservers, timeout=2.0)
        if not spf.get("valid") or not dmarc.get("valid"):
            failures.append((domain, spf.get("error"), dmarc.get("error")))
    seconds = time.perf_counter() - started
    print(f"checkdmarc_domains {len(domains)}")
    print(f"checkdmarc_seconds {seconds:.3f}")
    print(f"checkdmarc_domains_per_second {len(domains) / seconds:.1f}")
    print(f"checkdmarc_failed {len(failures)}")
    for domain, spf_error, dmarc_error in failures[:5]:
        print(f"checkdmarc: {domain}: SPF {spf_error!r} DMARC {dmarc_error!r}", file=sys.stderr)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
