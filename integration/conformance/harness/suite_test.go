//go:build linux
// +build linux

package benchsuite

import (
	"context"
	"os"
	"testing"

	"github.com/containerd/containerd/snapshots"
	"github.com/containerd/containerd/snapshots/testsuite"
)

// TestSnapshotterSuite runs containerd's conformance suite against CONFORMANCE_CMD: every
// case starts its own snapshotter on a fresh root and stops it at the end of the case.
func TestSnapshotterSuite(t *testing.T) {
	cfg := configFromEnv(os.Getenv("CONFORMANCE_CMD"))
	if cfg.template == "" {
		t.Fatal("CONFORMANCE_CMD is not set (e.g. '/usr/bin/snapshotter --root {root} --address {sock}')")
	}
	if os.Geteuid() != 0 {
		t.Fatal("the suite mounts overlay and bind filesystems: run it as root")
	}
	testsuite.SnapshotterSuite(t, cfg.name, func(ctx context.Context, root string) (snapshots.Snapshotter, func() error, error) {
		sn, inst, err := start(ctx, cfg, root)
		if err != nil {
			return nil, nil, err
		}
		return sn, inst.stop, nil
	})
}
