"""One module per `muse-jax` subcommand: its absl flags and a `main(argv)`."""
