"""Subcommands of the ``tokenreduce`` command line (see ``tokenreduce.cli``)."""
