"""One module per CLI command; each defines ``register(subparsers)`` and a handler ``run(args) -> int``."""
