"""graft.ir._gc.gc_paused: the cyclic collector is off inside, restored after (nesting, errors, a caller's choice)."""
import gc

import pytest

from graft.ir._gc import gc_paused


@pytest.fixture(autouse=True)
def _restore_gc():
    was = gc.isenabled()
    yield
    (gc.enable if was else gc.disable)()


def test_paused_inside_restored_after_nesting():
    gc.enable()
    with gc_paused():
        assert not gc.isenabled()
        with gc_paused():
            assert not gc.isenabled()
        assert not gc.isenabled()  # the inner exit does not re-enable it
    assert gc.isenabled()


def test_restored_after_an_error_and_as_decorator():
    gc.enable()

    @gc_paused()
    def boom():
        assert not gc.isenabled()
        raise RuntimeError("x")

    with pytest.raises(RuntimeError):
        boom()
    assert gc.isenabled()


def test_a_caller_that_disabled_gc_keeps_it_disabled():
    gc.disable()
    with gc_paused():
        assert not gc.isenabled()
    assert not gc.isenabled()
