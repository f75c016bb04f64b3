"""Fast unit tests of onepass.benchmark and ``python -m onepass``, one file per module of the
package (seconds, CPU only; no timing is asserted). Tests that use a peer (bitsandbytes, torchao)
skip when it is not installed. The benchmark itself (real cases, real timings) runs by hand:
``python -m onepass`` or ``pytest bench/ --benchmark-only``."""
