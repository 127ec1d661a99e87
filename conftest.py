# Makes the repository root importable for pytest (the modules are flat, top-level files).
