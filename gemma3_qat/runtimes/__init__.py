"""Real runtimes in the loop: the native programs our files are proven in (``gemma_cpp``: gemma.cpp)."""
