"""The test suite on every Python the package claims (``requires-python``).

    nox                     # every version found on this machine
    nox -p 3.10             # one version
    nox -s tests -- -k pool # arguments after -- go to pytest

A version not installed here is skipped with a warning (pyenv users:
``PYENV_VERSION=3.11.7:3.10.13:...`` makes its shims answer ``python3.10``;
``.ci/run`` does that). Each session installs the package as the README says
(``pip install -e '.[test]'``) into a fresh virtual environment.
"""

from __future__ import annotations

import nox

# Keep in step with requires-python and the classifiers in pyproject.toml.
PYTHONS = ["3.10", "3.11", "3.12", "3.13"]

nox.options.sessions = ["tests"]
nox.options.error_on_missing_interpreters = False


@nox.session(python=PYTHONS)
def tests(session: nox.Session) -> None:
    """The README's two commands: install with the test extra, run pytest."""
    session.install("-e", ".[test]")
    session.run("python", "-m", "pytest", *session.posargs)
