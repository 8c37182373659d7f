# IPython configuration for sandboxed kernels.  Loaded from this read-only
# package with --config; IPYTHONDIR itself lives on the sandbox's tmpfs, so
# nothing in /mnt/data can plant a profile or a startup file.
import os

c = get_config()  # noqa: F821

# Images: MPLBACKEND (set by the provisioner) selects matplotlib-inline, so
# plt.show() sends image/png display_data, and figures left open are shown at
# the end of the cell (unless BROKER_FIGURE_AUTOSHOW=0; see startup.py).
c.IPKernelApp.matplotlib = None
c.InlineBackend.figure_formats = {"png"}
c.InlineBackend.rc = {"figure.dpi": 100}

# History in memory: the tmpfs is small and the transcript is the record.
c.HistoryManager.hist_file = ":memory:"

c.InteractiveShellApp.exec_files = [os.path.join(os.path.dirname(__file__), "startup.py")]
