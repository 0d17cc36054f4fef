"""The command-line entry points build what their flags and environment say."""

from __future__ import annotations

from pathlib import Path

import pytest

from commander.__main__ import build_commander, build_parser
from commander.tools_main import build_parser as build_tools_parser


def test_defaults_come_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("DISPATCHER_ADDR", "10.0.0.1:6000")
    monkeypatch.setenv("COMMANDER_SLOTS", "3")
    monkeypatch.setenv("COMMANDER_TOKEN", "tok")
    monkeypatch.setenv("COMMANDER_ID", "c-7")
    monkeypatch.setenv("LLM_BASE_URL", "http://llm:1/v1")
    monkeypatch.setenv("LLM_MODEL", "big")
    monkeypatch.setenv("LLM_API_KEY", "sk-env")
    args = build_parser().parse_args([])
    commander = build_commander(args)
    assert commander.connection.target == "10.0.0.1:6000"
    assert commander.connection.token == "tok"
    assert len(commander.slots) == 3
    assert commander.commander_id == "c-7"
    assert list(commander.hello.capabilities) == ["planner:chat", "planner:gui"]
    chat = commander.planners.get("chat")
    settings = chat.settings  # type: ignore[attr-defined]
    assert (settings.base_url, settings.model, settings.api_key) == (
        "http://llm:1/v1",
        "big",
        "sk-env",
    )
    assert "sk-env" not in repr(settings) and "tok" not in repr(commander.connection)


def test_flags_override(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.delenv("DISPATCHER_ADDR", raising=False)
    ca = tmp_path / "ca.pem"
    ca.write_bytes(b"-----BEGIN CERTIFICATE-----\n")
    args = build_parser().parse_args(
        [
            "--dispatcher",
            "127.0.0.1:7000",
            "--slots",
            "2",
            "--label",
            "region=eu",
            "--label",
            "tier=gold",
            "--ca-cert",
            str(ca),
            "--with-tools",
            str(tmp_path / "ws"),
            "--log-level",
            "debug",
        ]
    )
    commander = build_commander(args)
    assert commander.connection.target == "127.0.0.1:7000"
    assert commander.connection.secure
    assert dict(commander.hello.labels) == {"region": "eu", "tier": "gold"}
    assert len(commander.slots) == 2
    assert args.log_level == "DEBUG"
    assert (tmp_path / "ws").is_dir()


def test_tenants_from_flags_or_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    def tenants(*argv: str) -> list[str]:
        return list(build_commander(build_parser().parse_args(list(argv))).hello.tenants)

    monkeypatch.delenv("COMMANDER_TENANTS", raising=False)
    assert tenants() == []
    monkeypatch.setenv("COMMANDER_TENANTS", "team-a, team-b,")
    assert tenants() == ["team-a", "team-b"]
    # Flags win over the environment; a name given twice is sent once.
    flags = ("--tenant", "team-c", "--tenant", "team-c", "--tenant", "ops")
    assert tenants(*flags) == ["team-c", "ops"]


def test_bad_flags_are_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("COMMANDER_SLOTS", "many")
    with pytest.raises(SystemExit):
        build_parser().parse_args([])
    monkeypatch.delenv("COMMANDER_SLOTS")
    with pytest.raises(SystemExit):
        build_parser().parse_args(["--slots", "0"])
    with pytest.raises(SystemExit):
        build_parser().parse_args(["--label", "novalue"])


def test_tools_parser(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TOOLS_ROOT", "/tmp/x")
    args = build_tools_parser().parse_args(["--dispatcher", "h:1"])
    assert args.root == "/tmp/x" and args.dispatcher == "h:1"


def test_several_dispatchers_and_hand_over_flags(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("DISPATCHER_ADDR", raising=False)
    args = build_parser().parse_args(
        [
            "--dispatcher",
            "a:1,b:2",
            "--dispatcher",
            "c:3",
            "--handover-timeout",
            "5",
            "--handover-buffer",
            "10",
        ]
    )
    commander = build_commander(args)
    assert commander.connection.targets == ("a:1", "b:2", "c:3")
    slot = commander.slots[0]
    assert slot.handover and slot._s.handover_timeout == 5 and slot._s.handover_buffer == 10
    # The default: one address, hand-over on.
    args = build_parser().parse_args([])
    commander = build_commander(args)
    assert commander.connection.targets == ("127.0.0.1:50051",)
    assert commander.slots[0].handover
    # 0 turns the hand-over off: sessions end with their stream.
    args = build_parser().parse_args(["--handover-timeout", "0"])
    assert not build_commander(args).slots[0].handover


def test_content_window_flag(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("COMMANDER_CONTENT_WINDOW", raising=False)
    assert build_commander(build_parser().parse_args([])).slots[0]._s.content_window == 64
    args = build_parser().parse_args(["--content-window", "0"])
    assert build_commander(args).slots[0]._s.content_window == 0
    with pytest.raises(SystemExit):
        build_parser().parse_args(["--content-window", "-1"])
