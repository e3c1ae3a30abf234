"""An upstream smarthost for the relay's tests: aiosmtpd (Debian package
python3-aiosmtpd) requiring TLS, STARTTLS or implicit, and AUTH, storing
each message it accepts as one file. It refuses `refuse@...` (550) and
defers `defer@...` (452).

    smtp_upstream.py PORT DIR CERT KEY {starttls|tls} USERNAME PASSWORD

Prints "ready" once it listens; runs until killed.
"""

import os
import signal
import ssl
import sys
import threading

from aiosmtpd.controller import Controller
from aiosmtpd.smtp import AuthResult, LoginPassword


class Store:
    def __init__(self, directory):
        self.directory = directory
        self.count = 0

    async def handle_RCPT(self, server, session, envelope, address, rcpt_options):
        # Recipients that make the smarthost refuse or defer, for tests of
        # what the relay passes on.
        if address.startswith("refuse@"):
            return "550 5.1.1 refuse@: no such user here"
        if address.startswith("defer@"):
            return "452 4.2.2 defer@: mailbox full, try later"
        envelope.rcpt_tos.append(address)
        return "250 OK"

    async def handle_DATA(self, server, session, envelope):
        self.count += 1
        name = os.path.join(self.directory, f"{self.count:06d}.eml")
        with open(name + ".tmp", "wb") as out:
            out.write(envelope.original_content)
        # Stored before the 250: nothing acknowledged is missing.
        os.rename(name + ".tmp", name)
        return "250 2.0.0 stored"


def main():
    port, directory, cert, key, mode, username, password = sys.argv[1:8]
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

    if mode == "tls":
        # Implicit TLS: the whole connection is TLS. aiosmtpd only counts
        # TLS begun with STARTTLS for auth_require_tls, so it is not set.
        tls = {"ssl_context": context, "auth_require_tls": False}
    else:
        tls = {"tls_context": context, "require_starttls": True, "auth_require_tls": True}
    controller = Controller(
        Store(directory),
        hostname="127.0.0.1",
        port=int(port),
        server_hostname="upstream.test",
        authenticator=authenticate,
        auth_required=True,
        **tls,
    )
    controller.start()
    print("ready", flush=True)
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    stop.wait()
    controller.stop()


if __name__ == "__main__":
    main()
