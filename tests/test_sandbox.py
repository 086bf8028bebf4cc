"""algos/sft.py run_python, SMART's Code tool: model-written code is contained, reported as a short tool error, and
the caller keeps working (a normal call right after each attack still runs)."""
import os
import time

import pytest

from algos.sft import run_python

ROOT_USER = os.geteuid() == 0


def nobody_processes():
    """Running processes of uid 65534 (not zombies: killed ones wait for init to reap them)."""
    found = []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            status = open(f"/proc/{pid}/status").read()
        except OSError:
            continue
        if "\nUid:\t65534\t" in status and "State:\tZ" not in status:
            found.append(pid)
    return found


def still_works():
    assert run_python("print(sum(range(10)))") == (True, "45\n")


def test_normal_code_returns_its_output():
    assert run_python("print(47 * 89)") == (True, "4183\n")
    code = "import math, fractions\nprint(math.comb(10, 3), fractions.Fraction(3, 6))"
    assert run_python(code) == (True, "120 1/2\n")
    ok, text = run_python("x = 1 / 0")
    assert not ok and text == "ZeroDivisionError: division by zero"
    ok, text = run_python("print('a'")
    assert not ok and text.startswith("SyntaxError")
    for junk in ("\x00", "\udcff", 3.5, None):  # never raises on any code string (or not a string at all)
        ok, text = run_python(junk)
        assert isinstance(ok, bool) and isinstance(text, str) and len(text) <= 300


def test_wall_clock_timeout_kills_a_sleeping_process():
    t = time.time()
    assert run_python("import time\ntime.sleep(60)", timeout_s=1) == (False, "timeout after 1 s")
    assert time.time() - t < 10
    still_works()


def test_cpu_bound_loop_stops_at_the_first_limit():
    t = time.time()
    assert run_python("while True: pass", timeout_s=1.5, cpu_s=30) == (False, "timeout after 1.5 s")
    assert run_python("while True: pass", timeout_s=60, cpu_s=1) == (False, "cpu time limit (1 s)")
    assert time.time() - t < 20
    still_works()


def no_live_nobody_process_soon():
    """Killed processes may take a moment to die on a loaded machine; none may be left running."""
    for _ in range(50):
        if not nobody_processes():
            return True
        time.sleep(0.1)
    return nobody_processes()


def test_fork_bomb_is_contained_and_leaves_no_process():
    t = time.time()
    ok, text = run_python("import os\nwhile True:\n    os.fork()", timeout_s=3)
    assert not ok and len(text) < 120 and time.time() - t < 15, text
    if ROOT_USER:  # the child ran as nobody: its process limit bit, and the group kill left nothing running
        assert "Resource temporarily unavailable" in text or text.startswith("timeout"), text
        assert no_live_nobody_process_soon() is True
    # a child left sleeping behind a finished run is killed with its group (a higher process limit: the bomb's
    # killed processes count against nobody's limit until init reaps them)
    code = "import os\nif os.fork() == 0:\n    import time\n    time.sleep(60)\nprint('parent')"
    assert run_python(code, max_procs=256) == (True, "parent\n")
    if ROOT_USER:
        assert no_live_nobody_process_soon() is True
    still_works()


def test_memory_bomb_hits_the_memory_limit():
    assert run_python("x = bytearray(10 ** 10)") == (False, "memory limit (512 MB)")
    assert run_python("x = [0] * 10 ** 9", memory_mb=256) == (False, "memory limit (256 MB)")
    still_works()


def test_megabytes_of_output_are_an_output_limit():
    ok, text = run_python("print('x' * 10 ** 7)")
    assert not ok and text.startswith("output limit")
    ok, text = run_python("for _ in range(10 ** 6):\n    print('y' * 100)")
    assert not ok and text.startswith("output limit")
    ok, text = run_python("print('z' * 5000)", max_output=100)  # over max_output but under the file limit: cut
    assert ok and text.startswith("z" * 100) and text.endswith("more bytes]") and len(text) < 130
    still_works()


def test_writes_outside_the_working_directory_are_refused(tmp_path):
    shared = tmp_path / "world_writable"
    shared.mkdir()
    shared.chmod(0o777)
    in_tmp = f"/tmp/sandbox_escape_{os.getpid()}"
    for target in (shared / "escaped.txt", in_tmp):
        ok, text = run_python(f"open({str(target)!r}, 'w').write('escaped')")
        assert not ok and text.startswith("PermissionError: sandbox: no writes outside") and len(text) < 200
        ok, text = run_python(f"import os\nfd = os.open({str(target)!r}, os.O_WRONLY | os.O_CREAT)")
        assert not ok and "PermissionError" in text
        assert not os.path.exists(target)
    ok, text = run_python("import os\nos.mkdir('../sandbox_dir_escape')")
    assert not ok and "PermissionError" in text
    # inside its own folder, files work; the folder is gone afterwards
    ok, text = run_python("import os\nopen('a.txt', 'w').write('hi')\nprint(open('a.txt').read(), os.getcwd())")
    assert ok and text.startswith("hi ") and not os.path.exists(text.split()[1])
    still_works()


def test_environment_secrets_are_not_returned(monkeypatch):
    secret = "s3cr3t-value-7341"
    monkeypatch.setenv("SECRET", secret)
    ok, text = run_python("import os\nprint(dict(os.environ))")
    assert ok and secret not in text and "SECRET" not in text
    ok, text = run_python(f"print(open('/proc/{os.getpid()}/environ', 'rb').read())")
    assert not ok and secret not in text and "PermissionError" in text
    ok, text = run_python("import os\nprint(open(f'/proc/{os.getppid()}/environ').read())")
    assert not ok and secret not in text
    still_works()


@pytest.mark.skipif(not ROOT_USER, reason="privileges are dropped only when running as root")
def test_root_runs_the_code_as_nobody():
    assert run_python("import os\nprint(os.getuid(), os.getgid(), os.getgroups())") == (True, "65534 65534 []\n")
