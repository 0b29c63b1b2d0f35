"""The error type for mistakes a user can fix; every entry point prints it as one line (see trainer/spine/runtime.py
run_main), so code anywhere below can raise it without knowing how it is shown."""


class UserError(Exception):
    """A mistake the user can fix (bad flag, missing file). Printed as one message, without a traceback."""
