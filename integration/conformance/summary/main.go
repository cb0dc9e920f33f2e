// summary reads the `go tool test2json` stream of a suite run on stdin and prints one
// `PASS|FAIL|SKIP <case> (<time>)` line per case of -parent as it finishes, the output of
// a failing case indented below it (with the end of its snapshotter's log), and a closing
// `N passed, M failed, K skipped`. The plain test output goes to -log. It exits 1 when a
// case failed, when the run failed outside the cases (a panic, the timeout, a lost case),
// or when nothing passed.
package main

import (
	"bufio"
	"encoding/json"
	"flag"
	"fmt"
	"io"
	"os"
	"regexp"
	"sort"
	"strings"
	"time"
)

type event struct {
	Action  string
	Test    string
	Elapsed float64
	Output  string
}

// the suite's log line naming a case's snapshotter log (written by the harness)
var logLine = regexp.MustCompile(`snapshotter pid \d+, log (/\S+?\.log)`)

func main() {
	parent := flag.String("parent", "TestSnapshotterSuite", "the test whose subtests are the cases")
	logPath := flag.String("log", os.DevNull, "file for the plain test output")
	flag.Parse()
	began := time.Now()
	plain, err := os.Create(*logPath)
	if err != nil {
		fmt.Fprintln(os.Stderr, err)
		os.Exit(2)
	}
	defer plain.Close()

	out := map[string]*strings.Builder{} // case -> its output
	running := map[string]bool{}
	var outside strings.Builder // output of the parent and of the binary itself
	var passed, failed, skipped int
	var parentFailed, parentSeen bool

	sc := bufio.NewScanner(os.Stdin)
	sc.Buffer(make([]byte, 1<<20), 64<<20)
	for sc.Scan() {
		var ev event
		if json.Unmarshal(sc.Bytes(), &ev) != nil {
			ev = event{Action: "output", Output: sc.Text() + "\n"}
		}
		io.WriteString(plain, ev.Output)
		name := strings.TrimPrefix(ev.Test, *parent+"/")
		if name == ev.Test { // not a case
			if ev.Test == *parent {
				parentSeen = true
				parentFailed = parentFailed || ev.Action == "fail"
			}
			if ev.Action == "output" && (ev.Test == "" || ev.Test == *parent) {
				outside.WriteString(ev.Output)
			}
			continue
		}
		if out[name] == nil {
			out[name] = &strings.Builder{}
		}
		switch ev.Action {
		case "run":
			running[name] = true
		case "output":
			out[name].WriteString(ev.Output)
		case "pass", "fail", "skip":
			delete(running, name)
			fmt.Printf("%s %s (%.2fs)\n", strings.ToUpper(ev.Action), name, ev.Elapsed)
			switch ev.Action {
			case "pass":
				passed++
			case "skip":
				skipped++
				indent(skipReason(out[name].String()), 1<<10)
			case "fail":
				failed++
				indent(out[name].String(), 32<<10)
				indentLogTail(out[name].String())
			}
		}
	}

	lost := make([]string, 0, len(running))
	for name := range running {
		lost = append(lost, name)
	}
	sort.Strings(lost)
	for _, name := range lost {
		fmt.Printf("FAIL %s (unfinished: the test binary died or timed out)\n", name)
		indent(out[name].String(), 8<<10)
		failed++
	}
	if failed == 0 && (!parentSeen || parentFailed) {
		fmt.Println("FAIL (outside the cases)")
		indent(outside.String(), 16<<10)
		failed++
	}
	fmt.Printf("suite wall time %.1fs\n", time.Since(began).Seconds())
	fmt.Printf("%d passed, %d failed, %d skipped\n", passed, failed, skipped)
	if failed > 0 || passed == 0 {
		os.Exit(1)
	}
}

// indent prints the end of s (at most max bytes) indented by six spaces (instead of the
// test log's four), without the framework's `=== RUN/PAUSE/CONT` lines.
func indent(s string, max int) {
	if len(s) > max {
		s = "…\n" + s[len(s)-max:]
	}
	for _, l := range strings.Split(strings.TrimRight(s, "\n"), "\n") {
		if !strings.HasPrefix(l, "=== ") {
			fmt.Println("      " + strings.TrimPrefix(l, "    "))
		}
	}
}

// skipReason keeps what the case said when it skipped, not the log lines around it.
func skipReason(s string) string {
	var keep []string
	for _, l := range strings.Split(s, "\n") {
		if !strings.Contains(l, "log_hook.go:") && !strings.Contains(l, "--- SKIP") {
			keep = append(keep, l)
		}
	}
	return strings.Join(keep, "\n")
}

// indentLogTail prints the last lines of the snapshotter log a failed case names, unless
// the failure already quotes it.
func indentLogTail(caseOutput string) {
	m := logLine.FindStringSubmatch(caseOutput)
	if m == nil || strings.Contains(caseOutput, "--- "+m[1]+" ---") {
		return
	}
	b, err := os.ReadFile(m[1])
	if err != nil {
		return
	}
	lines := strings.Split(strings.TrimRight(string(b), "\n"), "\n")
	if len(lines) > 30 {
		lines = lines[len(lines)-30:]
	}
	fmt.Printf("      --- %s (end) ---\n", m[1])
	indent(strings.Join(lines, "\n"), 16<<10)
}
