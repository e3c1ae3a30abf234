"""The SMTP server tests deliver to: aiosmtpd (Debian package
python3-aiosmtpd), as a plain sink (no TLS, no AUTH, like Postfix's
smtp-sink) or as a private smarthost that requires TLS (STARTTLS or
implicit) and AUTH.

Each accepted message is written to a temporary name and renamed to
NNNNNN.eml before the 250 goes out, NNNNNN counting up in the order the
messages were accepted (across restarts on the same directory). So the
directory holds exactly the messages this sink acknowledged or was about
to, each complete: one killed mid-transaction leaves at most a .tmp file,
never a cut-short .eml.

It advertises PIPELINING, as Postfix does (aiosmtpd handles pipelined
commands but does not say so), accepts lines of any length, refuses
`refuse@...` (550) and defers `defer@...` (452).

    smtp_sink.py PORT DIR plain
    smtp_sink.py PORT DIR {starttls|tls} CERT KEY USERNAME PASSWORD

Prints "ready" once it listens; runs until killed.
"""

import email.utils
import os
import signal
import ssl
import sys
import threading

import aiosmtpd.smtp
from aiosmtpd.controller import Controller
from aiosmtpd.smtp import AuthResult, LoginPassword

# smtp-sink takes any line length; the relay, not its upstream, enforces
# RFC 5321's limit, and tests must see what the relay sent.
aiosmtpd.smtp.SMTP.line_length_limit = 1 << 24


def next_number(directory):
    numbers = [
        int(name[:-4])
        for name in os.listdir(directory)
        if name.endswith(".eml") and name[:-4].isdigit()
    ]
    return max(numbers, default=0) + 1


class Store:
    def __init__(self, directory):
        self.directory = directory
        self.number = next_number(directory)

    async def handle_EHLO(self, server, session, envelope, hostname, responses):
        session.host_name = hostname
        return responses[:-1] + ["250-PIPELINING", responses[-1]]

    async def handle_RCPT(self, server, session, envelope, address, rcpt_options):
        # Recipients that make the sink refuse or defer, for tests of what
        # the relay passes on.
        if address.startswith("refuse@"):
            return "550 5.1.1 refuse@: no such user here"
        if address.startswith("defer@"):
            return "452 4.2.2 defer@: mailbox full, try later"
        envelope.rcpt_tos.append(address)
        return "250 OK"

    async def handle_DATA(self, server, session, envelope):
        number = self.number
        self.number += 1
        # What a next hop adds; the relay's signature must survive it.
        received = (
            f"Received: from {session.host_name} ([{session.peer[0]}])\r\n"
            f"\tby sink.test with ESMTP id {number:06d};\r\n"
            f"\t{email.utils.formatdate()}\r\n"
        ).encode()
        name = os.path.join(self.directory, f"{number:06d}.eml")
        with open(name + ".tmp", "wb") as out:
            out.write(received + envelope.original_content)
        # Stored, whole, before the 250: nothing acknowledged is missing.
        os.rename(name + ".tmp", name)
        return f"250 2.0.0 stored as {number:06d}"


def main():
    port, directory, mode = sys.argv[1:4]
    options = {}
    if mode != "plain":
        cert, key, username, password = sys.argv[4:8]
        context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        context.load_cert_chain(cert, key)

        def authenticate(server, session, envelope, mechanism, auth_data):
            ok = (
                isinstance(auth_data, LoginPassword)
                and auth_data.login.decode() == username
                and auth_data.password.decode() == password
            )
            # handled=False: aiosmtpd then answers a failure with 535 itself.
            return AuthResult(success=ok, handled=False)

        options = {"authenticator": authenticate, "auth_required": True}
        if mode == "tls":
            # Implicit TLS: the whole connection is TLS. aiosmtpd only counts
            # TLS begun with STARTTLS for auth_require_tls, so it is not set.
            options.update(ssl_context=context, auth_require_tls=False)
        elif mode == "starttls":
            options.update(tls_context=context, require_starttls=True, auth_require_tls=True)
        else:
            sys.exit(f"unknown mode {mode!r}: plain, starttls or tls")
    controller = Controller(
        Store(directory),
        hostname="127.0.0.1",
        port=int(port),
        server_hostname="sink.test",
        **options,
    )
    controller.start()
    print("ready", flush=True)
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    stop.wait()
    controller.stop()


if __name__ == "__main__":
    main()
