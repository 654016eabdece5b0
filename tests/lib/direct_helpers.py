"""Sites behind NAT routers for the direct-path tests and benchmark: a router namespace on
the lab's bridge (its WAN side) masquerading a site subnet with one node behind it."""

from __future__ import annotations

from netlab import Host, Lab


def add_site(lab: Lab, index: int, symmetric: bool = False) -> Host:
    """A router on the lab's bridge (its WAN) masquerading a site subnet 198.19.<index>.0/24
    with one node behind it; `symmetric`: a random port per destination (masquerade random)."""
    router = lab.add_host(f"router{index}")
    ns = lab._namespace(f"site{index}")
    subnet = f"198.19.{index}"
    router.run("ip", "link", "add", "lan0", "type", "veth", "peer", "name", "eth0", "netns", ns)
    router.run("ip", "addr", "add", f"{subnet}.1/24", "dev", "lan0")
    router.run("ip", "link", "set", "lan0", "up")
    router.run("sysctl", "-qw", "net.ipv4.ip_forward=1")
    flags = " random" if symmetric else ""
    script = (
        "table ip ncsite {\n  chain post {\n    type nat hook postrouting priority 100; policy accept;\n"
        f'    oifname "eth0" ip saddr {subnet}.0/24 masquerade{flags}\n  }}\n'
        "  chain between {\n    type filter hook forward priority 0; policy accept;\n  }\n"
        # As every home router: nothing unsolicited reaches the router itself. (Without
        # this a probe that arrives before the site's own one leaves is taken as a
        # connection to the router, and the site's probe then leaves from another port.)
        '  chain in {\n    type filter hook input priority 0; policy accept;\n    iifname "eth0" ct state new drop\n  }\n}\n'
    )
    router.run("nft", "-f", "-", input=script)
    node = Host(lab, f"site{index}", ns, f"{subnet}.2")
    node.run("ip", "addr", "add", f"{subnet}.2/24", "dev", "eth0")
    node.run("ip", "link", "set", "eth0", "up")
    node.run("ip", "route", "add", "default", "via", f"{subnet}.1")
    lab.hosts[node.name] = node
    return node


def cut_between(router: Host, other_router: Host) -> None:
    """nftables drop, in the router, of everything between it and the other site's router."""
    for direction in ("daddr", "saddr"):
        router.run("nft", "add", "rule", "ip", "ncsite", "between", "ip", direction, other_router.ip, "drop")
