# IPython configuration for sandboxed kernels.  Loaded from this read-only
# package with --config; IPYTHONDIR itself lives on the sandbox's tmpfs, so
# nothing in /mnt/data can plant a profile or a startup file.
import os

c = get_config()  # noqa: F821

# Images: MPLBACKEND (set by the provisioner) selects matplotlib-inline, so
# plt.show() sends image/png display_data.  Figures are not auto-displayed at
# the end of a cell: code that saves a chart with savefig gets the file back,
# not a second copy of the image.
c.IPKernelApp.matplotlib = None
c.InlineBackend.figure_formats = {"png"}
c.InlineBackend.rc = {"figure.dpi": 100}

# History in memory: the tmpfs is small and the transcript is the record.
c.HistoryManager.hist_file = ":memory:"

c.InteractiveShellApp.exec_files = [os.path.join(os.path.dirname(__file__), "startup.py")]
