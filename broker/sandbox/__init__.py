"""The sandbox layer: bubblewrap command, identity, cgroups, quota volume,
seccomp loading and the jupyter_client kernel provisioner.

It knows nothing of sessions or HTTP.
"""
