"""Validators: run an artifact in the runtime that will run it and compare it with the reference."""
