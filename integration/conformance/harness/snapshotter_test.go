//go:build linux
// +build linux

// Package benchsuite holds the harness: containerd's snapshotter conformance suite and its
// benchmark driver, run against snapshotter processes reached the way containerd reaches a
// [proxy_plugins] snapshotter. It is named after containerd's snapshots/benchsuite because
// run.sh compiles an unmodified copy of that package's benchmark_test.go into it.
package benchsuite

import (
	"bufio"
	"context"
	"fmt"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"sort"
	"strconv"
	"strings"
	"syscall"
	"time"

	snapshotsapi "github.com/containerd/containerd/api/services/snapshots/v1"
	"github.com/containerd/containerd/defaults"
	"github.com/containerd/containerd/log"
	"github.com/containerd/containerd/pkg/dialer"
	"github.com/containerd/containerd/snapshots"
	"github.com/containerd/containerd/snapshots/proxy"
	"google.golang.org/grpc"
	"google.golang.org/grpc/backoff"
)

// config says how to run one snapshotter. The template's {root} is the instance's root
// directory (it exists, empty) and {sock} the socket it must serve, {root}.sock. The
// expanded line runs as `/bin/sh -c 'exec LINE'`, so the process is the snapshotter itself.
type config struct {
	template     string
	name         string        // snapshotter name in every request (containerd: the proxy_plugins key)
	logDir       string        // one log file per instance; default: beside the root
	startTimeout time.Duration // until the socket accepts connections
	stopTimeout  time.Duration // from SIGTERM to SIGKILL (which fails the case)
}

func configFromEnv(template string) config {
	name := os.Getenv("CONFORMANCE_NAME")
	if name == "" {
		name = "cas"
	}
	return config{
		template:     template,
		name:         name,
		logDir:       os.Getenv("CONFORMANCE_LOGS"),
		startTimeout: seconds("CONFORMANCE_START_TIMEOUT", 20),
		stopTimeout:  seconds("CONFORMANCE_STOP_TIMEOUT", 10),
	}
}

func seconds(env string, def int) time.Duration {
	if n, err := strconv.Atoi(os.Getenv(env)); err == nil && n > 0 {
		return time.Duration(n) * time.Second
	}
	return time.Duration(def) * time.Second
}

// instance is one running snapshotter process.
type instance struct {
	cfg     config
	cmd     *exec.Cmd
	conn    *grpc.ClientConn
	dir     string // the directory holding root and socket: no mount may outlive the process
	logPath string
	exited  chan struct{} // closed once the process is reaped (cmd.ProcessState is set)
}

// start runs the snapshotter for root, waits for its socket and connects a proxy
// snapshotter to it. ctx only carries the logger (the suite's logs into the test).
func start(ctx context.Context, cfg config, root string) (snapshots.Snapshotter, *instance, error) {
	sock := root + ".sock"
	if len(sock) >= 108 {
		return nil, nil, fmt.Errorf("socket path %s is too long for a unix socket", sock)
	}
	line := strings.NewReplacer("{root}", root, "{sock}", sock).Replace(cfg.template)
	i := &instance{cfg: cfg, dir: filepath.Dir(root), exited: make(chan struct{})}
	logDir := cfg.logDir
	if logDir == "" {
		logDir = i.dir
	}
	if err := os.MkdirAll(logDir, 0o755); err != nil {
		return nil, nil, err
	}
	i.logPath = filepath.Join(logDir, filepath.Base(i.dir)+".log")
	logf, err := os.OpenFile(i.logPath, os.O_CREATE|os.O_WRONLY|os.O_APPEND|os.O_TRUNC, 0o644)
	if err != nil {
		return nil, nil, err
	}
	defer logf.Close() // the child has its own copy
	fmt.Fprintf(logf, "# %s\n", line)

	i.cmd = exec.Command("/bin/sh", "-c", "exec "+line)
	i.cmd.Stdout, i.cmd.Stderr = logf, logf
	i.cmd.SysProcAttr = &syscall.SysProcAttr{Setpgid: true, Pdeathsig: syscall.SIGKILL}
	if err := i.cmd.Start(); err != nil {
		return nil, nil, fmt.Errorf("start %s: %w", line, err)
	}
	go func() {
		_ = i.cmd.Wait()
		close(i.exited)
	}()
	log.G(ctx).Infof("snapshotter pid %d, log %s", i.cmd.Process.Pid, i.logPath)

	deadline := time.Now().Add(cfg.startTimeout)
	for {
		if c, err := net.DialTimeout("unix", sock, 100*time.Millisecond); err == nil {
			c.Close()
			break
		}
		select {
		case <-i.exited:
			i.stop()
			return nil, nil, fmt.Errorf("snapshotter exited before serving %s (%s)%s", sock, i.cmd.ProcessState, i.tail())
		case <-time.After(20 * time.Millisecond):
		}
		if time.Now().After(deadline) {
			i.stop()
			return nil, nil, fmt.Errorf("snapshotter not serving %s after %s%s", sock, cfg.startTimeout, i.tail())
		}
	}

	// containerd's dial options for a proxy plugin (services/server: proxyClients.getClient).
	bo := backoff.DefaultConfig
	bo.MaxDelay = 3 * time.Second
	i.conn, err = grpc.Dial(dialer.DialAddress(sock),
		grpc.WithInsecure(),
		grpc.WithConnectParams(grpc.ConnectParams{Backoff: bo}),
		grpc.WithContextDialer(dialer.ContextDialer),
		grpc.WithDefaultCallOptions(grpc.MaxCallRecvMsgSize(defaults.DefaultMaxRecvMsgSize)),
		grpc.WithDefaultCallOptions(grpc.MaxCallSendMsgSize(defaults.DefaultMaxSendMsgSize)),
	)
	if err != nil {
		i.stop()
		return nil, nil, fmt.Errorf("dial %s: %w", sock, err)
	}
	return proxy.NewSnapshotter(snapshotsapi.NewSnapshotsClient(i.conn), cfg.name), i, nil
}

// stop ends the process the way systemd's KillMode=mixed does: SIGTERM to the snapshotter,
// SIGKILL to it after the stop timeout and to whatever is left of its process group. It
// fails if the snapshotter had exited by itself, needed SIGKILL, or left mounts behind
// (they are detached, so the directory can be removed).
func (i *instance) stop() error {
	if i.conn != nil {
		i.conn.Close()
	}
	var problems []string
	pid := i.cmd.Process.Pid
	select {
	case <-i.exited:
		problems = append(problems, fmt.Sprintf("the snapshotter exited by itself during the case (%s)", i.cmd.ProcessState))
	default:
		_ = i.cmd.Process.Signal(syscall.SIGTERM)
		t0 := time.Now()
		select {
		case <-i.exited:
			i.note("stopped by SIGTERM after %s (%s)", time.Since(t0).Round(time.Millisecond), i.cmd.ProcessState)
		case <-time.After(i.cfg.stopTimeout):
			_ = syscall.Kill(-pid, syscall.SIGKILL)
			<-i.exited
			problems = append(problems, fmt.Sprintf("the snapshotter ignored SIGTERM for %s and was killed", i.cfg.stopTimeout))
		}
	}
	_ = syscall.Kill(-pid, syscall.SIGKILL)
	if left := detachMountsUnder(i.dir); len(left) > 0 {
		problems = append(problems, "mounts left behind: "+strings.Join(left, " "))
	}
	if len(problems) == 0 {
		return nil
	}
	i.note("%s", strings.Join(problems, "; "))
	return fmt.Errorf("%s%s", strings.Join(problems, "; "), i.tail())
}

// note appends a harness line to the instance's log.
func (i *instance) note(format string, args ...interface{}) {
	if f, err := os.OpenFile(i.logPath, os.O_WRONLY|os.O_APPEND, 0); err == nil {
		fmt.Fprintf(f, "# "+format+"\n", args...)
		f.Close()
	}
}

// tail is the end of the instance's log, for error messages.
func (i *instance) tail() string {
	b, err := os.ReadFile(i.logPath)
	if err != nil || len(b) == 0 {
		return ""
	}
	if len(b) > 4096 {
		b = b[len(b)-4096:]
	}
	return "\n--- " + i.logPath + " ---\n" + strings.TrimRight(string(b), "\n")
}

// detachMountsUnder lazily unmounts every mount point below dir, deepest first, and
// returns them.
func detachMountsUnder(dir string) []string {
	f, err := os.Open("/proc/self/mountinfo")
	if err != nil {
		return nil
	}
	defer f.Close()
	var found []string
	sc := bufio.NewScanner(f)
	for sc.Scan() {
		fields := strings.Fields(sc.Text())
		if len(fields) < 5 {
			continue
		}
		// field 5 is the mount point, with space, tab, newline and backslash octal-escaped
		if p, err := strconv.Unquote(`"` + fields[4] + `"`); err == nil && strings.HasPrefix(p, dir+"/") {
			found = append(found, p)
		}
	}
	sort.Sort(sort.Reverse(sort.StringSlice(found)))
	for _, p := range found {
		_ = syscall.Unmount(p, syscall.MNT_DETACH)
	}
	return found
}
