"""A command line through the suite's fork server (tests/forkserver.py): `python script args` or
`python -m accelerate.commands.launch <launch args> script args`, run as a forked job with this process's
environment and working folder, its exit code this process's. Its output is copied to this process's standard
output and error when it ends (files of its own: the ranks append to theirs, and a file this process shares with
a shell, opened again, would be written over by the shell's next write at its own offset). A signal to this
process (the `timeout` of scripts/gpu_check.sh) ends the job's whole process group, then copies what it wrote.
Imports nothing heavy: it starts in ~30 ms where the command's own imports take ~5 s.

    forkclient.py <server socket> script.py args...
    forkclient.py <server socket> - args...          # the program on standard input, as `python - args`
    forkclient.py <server socket> -m accelerate.commands.launch <launch args> script.py args...
    forkclient.py <server socket> -m module args...  # one process, as `python -m module args` (pytest)
    forkclient.py <server socket> /path/to/python -m accelerate.commands.launch ...   # the same, interpreter given

The server must have been started with the environment the command has (tests/test_gpu_check.py starts one
with the dry run's); the caller vouches for that, this client does not compare.
"""

import json
import os
import signal
import socket
import sys
import tempfile


def main(argv: list[str]) -> int:
    path, command = argv[0], argv[1:]
    if os.path.basename(command[0]).startswith("python") and not command[0].endswith(".py"):
        command = command[1:]  # an interpreter first (a command prefix before `python -m ...`): this one's place
    launcher, module = [], None
    if command[:2] == ["-m", "accelerate.commands.launch"]:
        at = next(i for i, arg in enumerate(command) if arg.endswith(".py"))
        launcher, command = command[2:at], command[at:]
    elif command[0] == "-m":
        module, command = command[1], command[1:]
    outputs = {stream: tempfile.mkstemp(prefix="forkclient-")[1] for stream in (sys.stdout, sys.stderr)}
    program = None
    if command[0] == "-":  # `python - <<EOF`: the program is read from stdin, written to a file the job runs
        fd, program = tempfile.mkstemp(prefix="forkclient-", suffix=".py")
        with os.fdopen(fd, "w") as f:
            f.write(sys.stdin.read())
        command = [program, *command[1:]]
    request = {"script": module or os.path.abspath(command[0]), "args": command[1:], "env": dict(os.environ),
               "cwd": os.getcwd(), "launch_args": launcher, "stdout": outputs[sys.stdout],
               "stderr": outputs[sys.stderr], "stdin": None, "module": module}

    def copy_output():
        for stream, name in outputs.items():
            with open(name, "rb") as f:
                stream.buffer.write(f.read())
            stream.buffer.flush()
            os.unlink(name)

    with socket.socket(socket.AF_UNIX) as conn:
        conn.connect(path)
        conn.sendall((json.dumps(request) + "\n").encode())
        replies = conn.makefile()
        pgid = json.loads(replies.readline())["pgid"]

        def end(signum, frame):
            os.killpg(pgid, signal.SIGKILL)
            copy_output()
            os._exit(128 + signum)

        for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
            signal.signal(sig, end)
        line = replies.readline()
    copy_output()
    if program:
        os.unlink(program)
    return json.loads(line)["returncode"] if line else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
