"""Describing a filter's changes, the ``pop3proxy filter`` command, and the plugin guide's example.
"""

from __future__ import annotations

from helpers.common import write_config
from helpers.filtering import CTX, HEADERS_OPTIONS, LUNCH, NEWSLETTER, P, REPO, TESTS, pipeline, run_cli
from helpers.filtering import _reset_plugins  # noqa: F401  (fixtures)

from pop3proxy.filtering.summary import change_summary


# -- describing changes, and the `pop3proxy filter` command -------------------------------------------


def test_change_summary():
    before = b"Subject: x\r\nX-Tracking-ID: 1\r\n\r\nbody\r\n"
    after = b"X-Filtered-By: pop3proxy\r\nSubject: x\r\n\r\nbody\r\n"
    assert change_summary(before, after) == [
        f"size: {len(before)} -> {len(after)} bytes",
        "headers changed:",
        "  + X-Filtered-By: pop3proxy",
        "  - X-Tracking-ID: 1",
        "body unchanged",
    ]
    changed = change_summary(before, before.replace(b"body", b"new\r\nbody"))
    assert changed[-1] == "body changed (6 -> 11 bytes, 0 lines removed, 1 added)"
    assert changed[1] == "headers unchanged"
    assert change_summary(b"X-Evil: \x1b[2J\r\n\r\n", b"\r\n")[2] == "  - X-Evil: \\x1b[2J"


def test_filter_command_on_sample_files(tmp_path):
    config = write_config(
        tmp_path / "c.toml",
        {"filters": [HEADERS_OPTIONS, {"use": "plugins.example_filter:SubjectWatch", "words": ["lunch"]}]},
    )
    result = run_cli("filter", "--config", str(config), str(LUNCH), str(NEWSLETTER))
    assert result.returncode == 0, result.stderr
    assert result.stderr == ""
    lunch = LUNCH.read_bytes()
    out = result.stdout
    expected_lunch = "\n".join(
        [
            f"== {LUNCH}",
            "verdict: headers: removed X-Tracking-ID; added X-Filtered-By",
            "verdict: subject-watch: subject contains lunch",
            "action: deliver",
            f"size: {len(lunch)} -> {len(lunch) - len(b'X-Tracking-ID: 0f0f0f') + len(b'X-Subject-Watch: lunch') + len(b'X-Filtered-By: pop3proxy') + 2} bytes",
            "headers changed:",
            "  + X-Subject-Watch: lunch",
            "  + X-Filtered-By: pop3proxy",
            "  - X-Tracking-ID: 0f0f0f",
            "body unchanged",
        ]
    )
    assert expected_lunch in out
    assert f"== {NEWSLETTER}" in out
    assert "  - X-Mailgun-Variables: {\"campaign\": \"spring-sale-2024\", \"customer_id\":" in out
    assert "Liebe Alice" not in out  # bodies are never shown


def test_filter_command_reports_failures_and_holds(tmp_path):
    config = write_config(tmp_path / "c.toml", {"filters": [{"use": f"{P}:Failing", "on_error": "hold"}]})
    result = run_cli("filter", "--config", str(config), str(LUNCH))
    assert result.returncode == 0
    assert "error: failing: ConnectionRefusedError: backend at 127.0.0.1:9 refused the connection" in result.stdout
    assert "action: hold" in result.stdout
    assert "Traceback" not in result.stdout + result.stderr


def test_filter_command_missing_file_and_bad_config(tmp_path):
    config = write_config(tmp_path / "c.toml", {"filters": [{"use": "headers"}]})
    missing = tmp_path / "nope.eml"
    result = run_cli("filter", "--config", str(config), str(LUNCH), str(missing))
    assert result.returncode == 2
    assert result.stderr.strip() == f"pop3proxy: cannot read {missing}: No such file or directory"
    assert result.stdout == ""
    bad = write_config(tmp_path / "bad.toml", {"filters": [{"use": "nosuchfilter"}]})
    result = run_cli("filter", "--config", str(bad), str(LUNCH))
    assert result.returncode == 2
    assert len(result.stderr.strip().splitlines()) == 1
    assert "unknown filter 'nosuchfilter'" in result.stderr
    assert "Traceback" not in result.stderr


# -- the plugin guide -------------------------------------------------------------------------------


def test_the_guide_contains_the_tested_example_verbatim():
    guide = (REPO / "docs" / "writing-a-filter.md").read_text()
    example = (TESTS / "plugins" / "example_filter.py").read_text()
    assert example.strip() in guide
    assert example.strip() in (REPO / "README.md").read_text()  # the README's "Writing a filter" too
    assert '[project.entry-points."pop3proxy.filters"]' in guide
    assert 'subject-watch = "' in guide


async def test_the_example_filter():
    data = LUNCH.read_bytes()
    flag = pipeline({"use": "plugins.example_filter:SubjectWatch", "words": ["LUNCH", "invoice"]})
    result = await flag.run(data, CTX)
    assert result.data == b"X-Subject-Watch: lunch\r\n" + data
    assert result.verdicts == ["subject-watch: subject contains lunch"]
    quarantine = pipeline({"use": "plugins.example_filter:SubjectWatch", "words": ["lunch"], "quarantine": True})
    result = await quarantine.run(data, CTX)
    assert (result.action, result.data) == ("quarantine", data)
    result = await flag.run(NEWSLETTER.read_bytes(), CTX)
    assert (result.data, result.verdicts) == (NEWSLETTER.read_bytes(), [])
