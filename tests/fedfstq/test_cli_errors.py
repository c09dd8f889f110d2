"""Every failed `fedfstq` command: one line on stderr, a documented exit code, no traceback."""

from __future__ import annotations

from pathlib import Path

import pytest
from cli_support import run_fedfstq

from broker.local import free_port
from common.exit_codes import ExitCode
from fedfstq import cli
from fedfstq.demo import write_toml

HEAVY = {"torch", "transformers", "peft"}


def run_cli(argv: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str]:
    """Exit code and stderr of ``fedfstq argv`` run in this process."""
    code = cli.main(argv)
    return code, capsys.readouterr().err


def assert_one_line(stderr: str, prog: str) -> str:
    lines = stderr.strip().splitlines()
    assert len(lines) == 1, stderr
    assert lines[0].startswith(f"{prog}: error: "), lines[0]
    assert "Traceback" not in stderr
    return lines[0]


# -- bad option values: refused while parsing --------------------------------------------------


@pytest.mark.parametrize(
    ("argv", "prog", "says"),
    [
        (["demo", "--clients", "0"], "fedfstq demo", "--clients"),
        (["demo", "--alpha", "nan"], "fedfstq demo", "--alpha"),
        (["demo", "--method", "gzip"], "fedfstq demo", "invalid choice"),
        (["demo", "--budget-bytes", "10"], "fedfstq demo", "--budget-bytes"),
        (["bench", "fleet", "--methods", "fstq,zip"], "fedfstq bench fleet", "'zip'"),
        (["bench", "fleet", "--dropout", "1"], "fedfstq bench fleet", "--dropout"),
        (["bench", "inference", "--keep", "1.5"], "fedfstq bench inference", "--keep"),
        (["enrol", "--client-id", "dev-1"], "fedfstq enrol", "required"),
        (["agent", "--broker-port", "x"], "fedfstq agent", "--broker-port"),
        (["bench"], "fedfstq bench", "required"),
        (["teleport"], "fedfstq", "invalid choice"),
        ([], "fedfstq", "required"),
    ],
)
def test_bad_options_are_one_line_and_exit_2(
    argv: list[str], prog: str, says: str, capsys: pytest.CaptureFixture[str]
) -> None:
    code, err = run_cli(argv, capsys)

    assert code == ExitCode.CONFIG == 2
    assert says in assert_one_line(err, prog)


def test_bad_option_loads_nothing_heavy(tmp_path: Path) -> None:
    done = run_fedfstq("demo", "--rounds", "-1", "--workdir", str(tmp_path))

    assert done.code == 2
    assert_one_line(done.stderr, "fedfstq demo")
    assert "fedfstq.option_types" in done.modules  # the listing works
    assert done.top_level & HEAVY == set()


# -- the demo's checks before anything is deleted or loaded -------------------------------------


def test_unknown_language_is_a_data_error_before_the_model_loads(tmp_path: Path) -> None:
    workdir = tmp_path / "run"

    done = run_fedfstq("demo", "--languages", "english,klingon", "--workdir", str(workdir))

    assert done.code == ExitCode.DATA == 3
    line = assert_one_line(done.stderr, "fedfstq demo")
    assert "klingon" in line and "english" in line  # names the culprit and what exists
    assert done.top_level & HEAVY == set()
    assert not workdir.exists()


def test_unreachable_broker_exits_5_before_anything_is_made(tmp_path: Path) -> None:
    workdir = tmp_path / "run"
    port = free_port()  # nothing listens there

    done = run_fedfstq("demo", "--broker", f"mqtt://127.0.0.1:{port}", "--workdir", str(workdir))

    assert done.code == ExitCode.BROKER_UNREACHABLE == 5
    assert f"127.0.0.1:{port} unreachable" in assert_one_line(done.stderr, "fedfstq demo")
    assert done.top_level & HEAVY == set()
    assert not workdir.exists()


@pytest.mark.parametrize("url", ["http://example.org", "mqtt://host:99999", "mqtts://h:8883"])
def test_bad_broker_url_exits_2(url: str, capsys: pytest.CaptureFixture[str]) -> None:
    code, err = run_cli(["demo", "--broker", url], capsys)

    assert code == ExitCode.CONFIG
    assert "--broker" in assert_one_line(err, "fedfstq demo")


def test_foreign_workdir_is_refused_and_left_untouched(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    (tmp_path / "thesis.tex").write_text("years of work")

    code, err = run_cli(["demo", "--model", "tiny", "--workdir", str(tmp_path)], capsys)

    assert code == ExitCode.CONFIG
    assert "--overwrite" in assert_one_line(err, "fedfstq demo")
    assert [p.name for p in tmp_path.iterdir()] == ["thesis.tex"]
    assert (tmp_path / "thesis.tex").read_text() == "years of work"


def test_bench_fleet_refuses_a_foreign_workdir_and_keeps_its_own_runs(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    foreign = tmp_path / "mine"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("keep me")
    code, err = run_cli(["bench", "fleet", "--workdir", str(foreign), "--model", "tiny"], capsys)
    assert code == ExitCode.CONFIG
    assert "--overwrite" in assert_one_line(err, "fedfstq bench fleet")
    assert [p.name for p in foreign.iterdir()] == ["notes.txt"]
    # A folder fedfstq made keeps what an earlier run left: only method folders are replaced.
    from fedfstq.workdir import MARKER, claim_workdir

    ours = claim_workdir(tmp_path / "runs", command="fedfstq bench fleet", fresh=False)
    (ours / "dense_fp16").mkdir()
    again = claim_workdir(tmp_path / "runs", command="fedfstq bench fleet", fresh=False)
    assert again == ours and {p.name for p in ours.iterdir()} == {MARKER, "dense_fp16"}


def test_a_model_that_does_not_load_exits_4(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    argv = ["demo", "--clients", "2", "--model", str(tmp_path / "no-model")]

    code, err = run_cli([*argv, "--workdir", str(tmp_path / "run")], capsys)

    assert code == ExitCode.MODEL == 4
    assert "no-model" in assert_one_line(err, "fedfstq demo")


# -- other commands ---------------------------------------------------------------------------


def test_enrol_refusal_exits_2(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    argv = ["enrol", "--client-id", "aggregator", "--password-file", str(tmp_path / "passwd")]

    code, err = run_cli([*argv, "--out-dir", str(tmp_path / "out")], capsys)

    assert code == ExitCode.CONFIG
    assert "reserved" in assert_one_line(err, "fedfstq enrol")


def test_missing_file_is_a_one_line_config_error(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    argv = ["enrol", "--client-id", "dev-1", "--password-file", str(tmp_path / "passwd")]
    argv += ["--out-dir", str(tmp_path / "out"), "--acl", str(tmp_path / "missing.acl")]

    code, err = run_cli(argv, capsys)

    assert code == ExitCode.CONFIG
    assert "missing.acl" in assert_one_line(err, "fedfstq enrol")


def test_status_without_a_readable_config_exits_2(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    code, err = run_cli(["status", "--config", str(tmp_path / "nope.toml")], capsys)

    assert code == ExitCode.CONFIG
    lines = err.strip().splitlines()
    assert len(lines) == 1 and "nope.toml" in lines[0] and "Traceback" not in err


@pytest.mark.parametrize("service", ["aggregator", "agent"])
def test_invalid_service_settings_are_one_line_naming_each_bad_key(
    service: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    config = tmp_path / f"{service}.toml"
    config.write_text('fleet = "f1"\nbogus = 1\n[mqtt]\nport = 0\n')

    code, err = run_cli([service, "--config", str(config)], capsys)

    assert code == ExitCode.CONFIG
    text = capsys.readouterr().err + err
    lines = [line for line in text.strip().splitlines() if line.strip()]
    assert len(lines) == 1 and "Traceback" not in text, text
    assert "bogus" in lines[0] and "mqtt.port" in lines[0] and "state_dir" in lines[0]


@pytest.mark.parametrize(
    ("argv", "code"),
    [
        # The container's health probe, every 30 s: unhealthy, as there is no store yet.
        (["aggregator", "--check", "--state-dir", "{tmp}"], ExitCode.UNEXPECTED),
        (["aggregator", "--config", "{tmp}/missing.toml"], ExitCode.CONFIG),
    ],
)
def test_aggregator_check_and_config_errors_load_nothing_heavy(
    argv: list[str], code: ExitCode, tmp_path: Path
) -> None:
    done = run_fedfstq(*(a.format(tmp=tmp_path) for a in argv))

    assert done.code == code
    assert done.top_level & (HEAVY | {"paho"}) == set()


def test_agent_check_with_a_missing_data_file_exits_3(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    config = tmp_path / "agent.toml"
    write_toml(config, {
        "client_id": "dev-1", "data_path": str(tmp_path / "gone.jsonl"), "model": "tiny",
        "state_dir": str(tmp_path / "state"), "mqtt": {"host": "127.0.0.1", "port": free_port()},
    })  # fmt: skip

    code, err = run_cli(["agent", "--config", str(config), "--check-config"], capsys)

    assert code == ExitCode.DATA == 3
    lines = err.strip().splitlines()  # the agent logs it (journald): one line, no traceback
    assert len(lines) == 1 and "gone.jsonl" in lines[0] and "Traceback" not in err


# -- errors nobody expected ---------------------------------------------------------------------


def _broken_enrol(*args: object, **kwargs: object) -> Path:
    raise ZeroDivisionError("a bug")


def test_unexpected_error_is_one_line_with_a_hint(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr("fedfstq.enrol.enrol", _broken_enrol)
    argv = ["enrol", "--client-id", "d", "--password-file", str(tmp_path / "p")]

    code, err = run_cli([*argv, "--out-dir", str(tmp_path)], capsys)

    assert code == ExitCode.UNEXPECTED == 1
    line = assert_one_line(err, "fedfstq enrol")
    assert "ZeroDivisionError: a bug" in line and "run with -v for the traceback" in line


@pytest.mark.parametrize("where", ["before", "after"])
def test_verbose_adds_the_traceback(
    where: str,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr("fedfstq.enrol.enrol", _broken_enrol)
    argv = ["enrol", "--client-id", "d", "--password-file", str(tmp_path / "p")]
    argv += ["--out-dir", str(tmp_path)]

    code, err = run_cli(["-v", *argv] if where == "before" else [*argv, "-v"], capsys)

    assert code == ExitCode.UNEXPECTED
    assert err.startswith("Traceback") and "_broken_enrol" in err
    last = err.strip().splitlines()[-1]
    assert last == "fedfstq enrol: error: unexpected ZeroDivisionError: a bug"
