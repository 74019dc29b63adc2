"""Issue 16 item 5: a report records the commit and a hash of the config that produced it."""

from __future__ import annotations

import hashlib

from curvkit.experiments.report import provenance_line


def test_provenance_names_the_commit_and_the_config_hash(tmp_path):
    (tmp_path / "config.toml").write_text('title = "x"\n')
    line = provenance_line(tmp_path)
    digest = hashlib.sha256(b'title = "x"\n').hexdigest()[:16]
    assert f"config.toml sha256 `{digest}`" in line
    commit = line.split("commit `")[1].split("`")[0]
    # a git checkout gives the hash (+dirty), an installed copy outside git says so
    assert commit == "unknown" or len(commit.removesuffix("+dirty")) == 12
    assert "sha256 `none`" in provenance_line(tmp_path / "missing")
