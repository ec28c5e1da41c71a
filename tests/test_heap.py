"""The collector settings autotp changes for its own passes are given back as they were."""

import gc

from autotp.heap import collector_paused, old_objects_frozen


def test_old_objects_are_frozen_inside_and_thawed_after():
    before = object()
    assert gc.get_freeze_count() == 0
    with old_objects_frozen():
        assert gc.get_freeze_count() > 0  # what existed on entry is out of the collector's sight
        with old_objects_frozen():  # nested: the outer one thaws
            pass
        assert gc.get_freeze_count() > 0
    assert gc.get_freeze_count() == 0 and gc.isenabled()
    assert before is not None


def test_a_process_freeze_is_left_alone():
    gc.freeze()
    try:
        frozen = gc.get_freeze_count()
        with old_objects_frozen():
            pass
        # not thawed by autotp (a thaw empties the frozen generation; an object freed while
        # frozen leaves it too, so the count may fall by a few: it fell by 3 in one full run)
        assert gc.get_freeze_count() > 0.99 * frozen
    finally:
        gc.unfreeze()


def test_collector_paused_restores_its_state():
    with collector_paused():
        assert not gc.isenabled()
    assert gc.isenabled()
    gc.disable()
    try:
        with collector_paused():
            pass
        assert not gc.isenabled()  # it was off before: it stays off
    finally:
        gc.enable()


def test_frozen_on_error_too():
    try:
        with old_objects_frozen():
            raise KeyError("x")
    except KeyError:
        pass
    assert gc.get_freeze_count() == 0
