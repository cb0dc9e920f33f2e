//go:build linux
// +build linux

// refsnapshotter is the reference for the conformance suite and the benchmark: containerd's
// own overlayfs snapshotter, as containerd registers it (with AsynchronousRemove), served
// out of process over the Snapshots gRPC API on a unix socket, the way a proxy plugin is.
//
//	refsnapshotter --root DIR --address SOCK
//
// SIGTERM or SIGINT stops it: the server, then the snapshotter, then the socket goes.
package main

import (
	"flag"
	"fmt"
	"net"
	"os"
	"os/signal"
	"syscall"

	snapshotsapi "github.com/containerd/containerd/api/services/snapshots/v1"
	"github.com/containerd/containerd/contrib/snapshotservice"
	"github.com/containerd/containerd/snapshots/overlay"
	"google.golang.org/grpc"
)

func main() {
	root := flag.String("root", "", "snapshotter root directory")
	address := flag.String("address", "", "unix socket to serve")
	flag.Parse()
	if *root == "" || *address == "" || flag.NArg() > 0 {
		fmt.Fprintln(os.Stderr, "usage: refsnapshotter --root DIR --address SOCK")
		os.Exit(2)
	}
	if err := serve(*root, *address); err != nil {
		fmt.Fprintln(os.Stderr, "refsnapshotter:", err)
		os.Exit(1)
	}
}

func serve(root, address string) error {
	sn, err := overlay.NewSnapshotter(root, overlay.AsynchronousRemove)
	if err != nil {
		return err
	}
	defer sn.Close()

	if err := os.Remove(address); err != nil && !os.IsNotExist(err) {
		return err
	}
	l, err := net.Listen("unix", address)
	if err != nil {
		return err
	}
	defer os.Remove(address)

	srv := grpc.NewServer()
	snapshotsapi.RegisterSnapshotsServer(srv, snapshotservice.FromSnapshotter(sn))
	sigs := make(chan os.Signal, 1)
	signal.Notify(sigs, syscall.SIGTERM, syscall.SIGINT)
	go func() {
		<-sigs
		srv.Stop()
	}()
	fmt.Fprintf(os.Stderr, "refsnapshotter: overlayfs on %s, serving %s\n", root, address)
	return srv.Serve(l)
}
