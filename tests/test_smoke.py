"""The locked-down kernel starts, runs code in /mnt/data, and is confined."""


def test_kernel_runs_in_mnt_data(kernel):
    r = kernel.run("import os; print(os.getcwd()); open('hello.txt', 'w').write('hi')")
    assert r.status == "ok", r
    assert r.stdout.strip() == "/mnt/data"
    with open(f"{kernel.data_dir}/hello.txt") as fh:
        assert fh.read() == "hi"


def test_kernel_is_seccomp_filtered_and_unprivileged(kernel):
    r = kernel.run("""
        status = open('/proc/self/status').read()
        fields = dict(line.split(':', 1) for line in status.splitlines())
        print(fields['Seccomp'].strip(), fields['NoNewPrivs'].strip(), fields['CapEff'].strip())
    """)
    assert r.status == "ok", r
    assert r.stdout.split() == ["2", "1", "0000000000000000"]
