//go:build linux
// +build linux

package benchsuite

import (
	"context"
	"fmt"
	"os"
	"path/filepath"
	"testing"
)

// BenchmarkProxy runs upstream's benchmarkSnapshotter (benchmark_test.go: 16 layers of
// 1 MiB files, Prepare, write through a mount, Commit) once per CONFORMANCE_CMD_<n>,
// n = 1, 2, …, as the sub-benchmark CONFORMANCE_LABEL_<n>, each on a fresh root.
func BenchmarkProxy(b *testing.B) {
	n := 0
	for ; os.Getenv(fmt.Sprintf("CONFORMANCE_CMD_%d", n+1)) != ""; n++ {
	}
	if n == 0 {
		b.Skip("CONFORMANCE_CMD_1 is not set")
	}
	for k := 1; k <= n; k++ {
		cfg := configFromEnv(os.Getenv(fmt.Sprintf("CONFORMANCE_CMD_%d", k)))
		label := os.Getenv(fmt.Sprintf("CONFORMANCE_LABEL_%d", k))
		if label == "" {
			label = fmt.Sprintf("s%d", k)
		}
		b.Run(label, func(b *testing.B) {
			dir, err := os.MkdirTemp("", "bench-"+label+"-")
			if err != nil {
				b.Fatal(err)
			}
			defer os.RemoveAll(dir)
			root := filepath.Join(dir, "root")
			if err := os.Mkdir(root, 0o755); err != nil {
				b.Fatal(err)
			}
			sn, inst, err := start(context.Background(), cfg, root)
			if err != nil {
				b.Fatal(err)
			}
			defer func() {
				if err := inst.stop(); err != nil {
					b.Error(err)
				}
			}()
			benchmarkSnapshotter(b, sn)
		})
	}
}
