"""One module per `keypulse` subcommand."""
