"""Set-up shared by the tests and the doctests: nothing written to the user's cache.

``monetdsl.optimize`` keeps solved schedules in the user's cache directory by default
(``$XDG_CACHE_HOME/monetdsl``); every test and doctest gets its own, empty one, and the
schedules kept in memory are forgotten, so no test sees what another one solved.
"""
import pytest


@pytest.fixture(autouse=True)
def _private_cache_dir(tmp_path_factory, monkeypatch):
    from monetdsl.runtime import schedule_cache

    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path_factory.mktemp("xdg-cache")))
    schedule_cache.forget()
    yield
    schedule_cache.forget()
