"""The one printer of the admin commands: a table shows what a peer wrote (a node's host
name, its version) with control characters escaped, so a crafted HELLO cannot clear the
screen, retitle the terminal or forge a row; -o json keeps the exact strings."""

from __future__ import annotations

import argparse
import json

import pytest

import ncctl

HOSTILE = "\x1b[2J\x1b]0;owned\x07edge\r\nreserverd  default  10.1.1.1"


def test_a_table_escapes_control_characters_in_every_cell() -> None:
    lines = ncctl.Table(["NODE-TOKEN", "HOST"], [["abc", HOSTILE]]).lines()
    assert len(lines) == 2, lines  # the CR/LF did not make a row of its own
    assert not any(ch in "".join(lines) for ch in "\x1b\x07\r\n")
    assert "\\x1b[2J" in lines[1] and "\\r\\nreserverd" in lines[1]


def test_json_keeps_the_exact_string(capsys: pytest.CaptureFixture[str]) -> None:
    ncctl.show(argparse.Namespace(output="json"), [{"hostName": HOSTILE}], ncctl.Table(["HOST"], [[HOSTILE]]))
    assert json.loads(capsys.readouterr().out) == [{"hostName": HOSTILE}]


def test_text_output_is_the_table(capsys: pytest.CaptureFixture[str]) -> None:
    ncctl.show(argparse.Namespace(output="text"), {}, ncctl.Table(["A", "B"], [["1", "22"], ["333", "4"]]))
    assert capsys.readouterr().out.splitlines() == ["A    B", "1    22", "333  4"]


def test_every_drop_reason_in_the_code_is_a_metric_series_from_the_start() -> None:
    """nc_drops_total lists DROP_REASONS at 0 before anything drops; a reason the code
    counts but the list lacks would appear only once it happens (no baseline for rate())."""
    import re
    from pathlib import Path

    source = Path(ncctl.__file__).read_text()
    counted = set(re.findall(r'counters\["dropped-([a-z-]+)"\]', source))
    counted |= set(re.findall(r'BadFrame\(\s*"([a-z-]+)"', source))
    counted |= {"udp-" + r for r in re.findall(r'(?:_drop_datagram|dropped)\(\s*"([a-z-]+)"', source)}
    sealing = {"udp-bad-share", "udp-counter-exhausted"}  # a key share refused at the hello; a sender's own counter
    counted |= {"udp-" + r for r in re.findall(r'BadDatagram\("([a-z-]+)"\)', source)} - sealing
    counted -= {r for r in counted if r.startswith("direct-")}  # a node's own, in `nc status`, not the server's
    assert counted and counted <= set(ncctl.DROP_REASONS), counted - set(ncctl.DROP_REASONS)


def test_status_escapes_what_a_peer_wrote_and_json_keeps_it(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """`nc status` shows the server's refusal text and the peers' fields through the same
    escaping as the tables: no control character reaches the terminal; -o json is exact."""
    status = {
        "state": "connecting",
        "nodeToken": "abc",
        "lastError": HOSTILE,
        "peers": [{"ip": "10.1.1.3", "path": "direct", "endpoint": HOSTILE, "rxBytes": 1, "txBytes": 2}],
    }
    monkeypatch.setattr(ncctl, "ask_status", lambda _work_dir: status)
    assert ncctl.cmd_status(argparse.Namespace(work_dir="/nonexistent", output="text")) == 1
    out = capsys.readouterr().out
    assert not any(ch in out for ch in "\x1b\x07\r"), out
    assert "reserverd" not in "".join(line.split()[0] for line in out.splitlines() if line.strip()), out
    assert out.count("\\x1b[2J") == 2 and "peers:" in out, out
    ncctl.cmd_status(argparse.Namespace(work_dir="/nonexistent", output="json"))
    assert json.loads(capsys.readouterr().out) == status


def test_a_refused_command_line_keeps_argparses_words_and_gives_main_the_line(
    capsys: pytest.CaptureFixture[str],
) -> None:
    """argparse's refusal reads as before on stderr; main() gets the line for `-o json`'s error object."""
    with pytest.raises(ncctl.CommandLineRefused) as info:
        ncctl.build_parser().parse_args(["adm", "node", "state", "-o", "json"])
    assert info.value.code == ncctl.EXIT_USAGE
    assert info.value.line == "nc adm node state: the following arguments are required: --node-token"
    assert capsys.readouterr().err.splitlines()[-1] == (
        "nc adm node state: error: the following arguments are required: --node-token"
    )
    for argv, wanted in (
        (["adm", "node", "list", "-o", "json"], True),
        (["adm", "--output=json", "node", "list"], True),
        (["adm", "-ojson", "node", "list"], True),
        (["adm", "node", "list", "-o", "wide"], False),
        (["adm", "token", "create", "--net", "json"], False),
    ):
        assert ncctl.asks_for_json(argv) is wanted, argv


def test_the_node_list_fits_100_columns_at_its_widest(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """The longest of everything the narrow table shows: a 63-character name, a long network
    name, a 15-character address, an idle node last seen years ago; -o wide shows them whole."""
    pb = ncctl.grpc_modules()[1]
    widest = pb.NodeInfo(
        name="n" * 63,
        nodeToken="a" * 16,
        network="edge-" + "x" * 58,
        bindIp="100.100.100.100",
        connState=ncctl.STATE_IDLE,
        transport="tcp",
        lastSeen="2001-01-01T00:00:00+00:00",
        hostName="h" * 200,
        endpoint="[2001:db8:ffff:ffff:ffff:ffff:ffff:ffff]:65535",
    )
    connected = pb.NodeInfo(name="edge", nodeToken="b" * 16, network="default", bindIp="10.1.1.2", connState=3)
    response = pb.ListNodesResponse(nodes=[widest, connected])
    monkeypatch.setattr(ncctl, "admin_rpc", lambda *_args: response)
    ncctl.adm_node_list(argparse.Namespace(output="text"))
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == 3 and max(len(line) for line in lines) <= 100, "\n".join(lines)
    assert lines[1].split()[4:6] == ["idle", "tcp"] and lines[1].endswith("d ago"), lines[1]
    ncctl.adm_node_list(argparse.Namespace(output="wide"))
    assert "n" * 63 in capsys.readouterr().out
