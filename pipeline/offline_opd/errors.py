"""The one base class for errors a user can fix (bad params, paths, prompt files, shards, provenance).

Stage entry points print these as one line naming the file and the fix, and exit with status 2;
any other exception is a bug and keeps its traceback.
"""


class UserError(Exception):
    """Bad input a user can fix; the message names the file, the field and the fix."""
