// The pod sandbox ("pause") image of the local test node: it holds the pod's
// namespaces and does nothing until it is told to stop. Built here so that
// no image is ever pulled from a registry (tests/controlplane/node.sh).
package main

import (
	"os"
	"os/signal"
	"syscall"
)

func main() {
	stop := make(chan os.Signal, 1)
	signal.Notify(stop, syscall.SIGINT, syscall.SIGTERM)
	<-stop
}
