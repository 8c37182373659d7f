"""What runs inside the sandbox: the boot script, the audit hook, Landlock and
the IPython profile.

Nothing here imports :mod:`broker`: this package runs inside the sandbox, on its
own, from a read-only bind of the installed files.
"""
