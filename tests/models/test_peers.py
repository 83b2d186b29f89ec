"""A peer runtime that crashes fails one call with a message naming it; the caller lives on."""
import pytest

from models.llama import peers


def test_a_peer_killed_by_a_signal_is_a_peer_error_naming_it():
    with peers.Peer("libc", "ctypes:CDLL", None) as peer:
        with pytest.raises(peers.PeerError, match=r"libc was killed by SIGSEGV during raise"):
            peer.call("raise", 11)  # raise(SIGSEGV) inside the child
        with pytest.raises(peers.PeerError, match="SIGSEGV"):  # and it stays failed
            peer.call("getpid")


def test_a_peer_that_cannot_start_says_why():
    with pytest.raises(peers.PeerError, match=r"nosuch could not start: ModuleNotFoundError"):
        peers.Peer("nosuch", "no_such_module_here:Thing")


def test_a_peer_exception_is_reported_and_the_peer_keeps_serving():
    with peers.Peer("a list", "builtins:list", [3, 1, 2]) as peer:
        with pytest.raises(peers.PeerError, match=r"a list raised in index: ValueError"):
            peer.call("index", 42)
        assert peer.call("count", 3) == 1


def test_a_peer_that_hangs_is_stopped_after_its_timeout():
    peer = peers.Peer("libc", "ctypes:CDLL", None, timeout=1.0)
    with pytest.raises(peers.PeerError, match="did not answer pause within 1 s"):
        peer.call("pause")  # pause() waits for a signal forever
    peer.close()


@pytest.mark.skipif(not peers.available("llama_cpp"), reason="pip install llama-cpp-python (the llama.cpp oracle)")
def test_llama_cpp_runs_without_extra_buffer_types():
    """The AMX backend only enters through llama.cpp's extra buffer types (weight repacking)."""
    from models.llama import gguf_loader

    with peers.llama_cpp(gguf_loader.bundled_model_path(), vocab_only=True) as llm:
        assert llm.call("info")["use_extra_bufts"] is False
