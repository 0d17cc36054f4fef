package main

import (
	"encoding/json"
	"fmt"
	"io"
	"math"
	"sort"
	"strings"
	"text/tabwriter"

	"github.com/agentdispatch/dispatcher/internal/benchkit"
)

// result is what one scenario run reports: its parameters, its latencies
// (percentiles), its scalar measurements, and the checks it made.
type result struct {
	Scenario  string         `json:"scenario"`
	Label     string         `json:"label,omitempty"`
	Params    map[string]any `json:"params"`
	Latencies []latency      `json:"latencies,omitempty"`
	Values    []value        `json:"values,omitempty"`
	Checks    []check        `json:"checks,omitempty"`
	Notes     []string       `json:"notes,omitempty"`
	OK        bool           `json:"ok"`
}

type latency struct {
	Name    string         `json:"name"`
	Summary map[string]any `json:"summary"`
	text    string
}

type value struct {
	Name  string  `json:"name"`
	Value float64 `json:"value"`
	Unit  string  `json:"unit"`
}

type check struct {
	Name   string `json:"name"`
	Pass   bool   `json:"pass"`
	Detail string `json:"detail,omitempty"`
}

func newResult(scenario string, params map[string]any) *result {
	return &result{Scenario: scenario, Params: params, OK: true}
}

func (r *result) latency(name string, s benchkit.Summary) {
	r.Latencies = append(r.Latencies, latency{Name: name, Summary: s.JSON(), text: s.String()})
}

func (r *result) value(name string, v float64, unit string) {
	if math.IsNaN(v) || math.IsInf(v, 0) {
		v = 0
	}
	r.Values = append(r.Values, value{Name: name, Value: math.Round(v*1000) / 1000, Unit: unit})
}

func (r *result) check(name string, pass bool, format string, args ...any) {
	r.Checks = append(r.Checks, check{Name: name, Pass: pass, Detail: fmt.Sprintf(format, args...)})
	if !pass {
		r.OK = false
	}
}

func (r *result) note(format string, args ...any) {
	r.Notes = append(r.Notes, fmt.Sprintf(format, args...))
}

// print writes the result for a person.
func (r *result) print(w io.Writer) {
	keys := make([]string, 0, len(r.Params))
	for k := range r.Params {
		keys = append(keys, k)
	}
	sort.Strings(keys)
	var params []string
	for _, k := range keys {
		params = append(params, fmt.Sprintf("%s=%v", k, r.Params[k]))
	}
	fmt.Fprintf(w, "scenario %s: %s\n", r.Scenario, strings.Join(params, " "))
	tw := tabwriter.NewWriter(w, 0, 4, 2, ' ', 0)
	for _, l := range r.Latencies {
		fmt.Fprintf(tw, "  %s\t%s\n", l.Name, l.text)
	}
	for _, v := range r.Values {
		fmt.Fprintf(tw, "  %s\t%s %s\n", v.Name, formatValue(v.Value), v.Unit)
	}
	for _, c := range r.Checks {
		verdict := "ok"
		if !c.Pass {
			verdict = "FAILED"
		}
		fmt.Fprintf(tw, "  check %s\t%s\t%s\n", c.Name, verdict, c.Detail)
	}
	tw.Flush()
	for _, n := range r.Notes {
		fmt.Fprintf(w, "  note: %s\n", n)
	}
}

// formatValue prints large numbers whole with thousands separators and
// small ones with three significant digits.
func formatValue(v float64) string {
	if math.Abs(v) < 100 && v != math.Trunc(v) {
		return fmt.Sprintf("%.3g", v)
	}
	digits := fmt.Sprintf("%.0f", math.Abs(v))
	var b strings.Builder
	if v < 0 {
		b.WriteByte('-')
	}
	for i, c := range digits {
		if i > 0 && (len(digits)-i)%3 == 0 {
			b.WriteByte(',')
		}
		b.WriteRune(c)
	}
	return b.String()
}

// num formats a JSON number of the report.
func num(v any) string {
	f, ok := v.(float64)
	if !ok {
		return fmt.Sprint(v)
	}
	if f == math.Trunc(f) && math.Abs(f) >= 1000 {
		return formatValue(f)
	}
	return fmt.Sprint(f)
}

// printJSON writes the result as one JSON line.
func (r *result) printJSON(w io.Writer) error {
	b, err := json.Marshal(r)
	if err != nil {
		return err
	}
	_, err = fmt.Fprintf(w, "%s\n", b)
	return err
}

// report reads JSON result lines (as --json prints them) and prints one
// table of latencies and one of values, across scenarios.
func report(in io.Reader, w io.Writer) (ok bool, err error) {
	dec := json.NewDecoder(in)
	var results []result
	for dec.More() {
		var r result
		if err := dec.Decode(&r); err != nil {
			return false, fmt.Errorf("reading results: %w", err)
		}
		results = append(results, r)
	}
	ok = true
	tw := tabwriter.NewWriter(w, 0, 4, 2, ' ', 0)
	fmt.Fprintln(tw, "scenario\tlatency\tn\tp50 ms\tp90 ms\tp99 ms\tmax ms")
	for _, r := range results {
		for _, l := range r.Latencies {
			s := l.Summary
			fmt.Fprintf(tw, "%s\t%s\t%s\t%s\t%s\t%s\t%s\n", label(r), l.Name, num(s["n"]), num(s["p50_ms"]), num(s["p90_ms"]), num(s["p99_ms"]), num(s["max_ms"]))
		}
	}
	tw.Flush()
	fmt.Fprintln(w)
	tw = tabwriter.NewWriter(w, 0, 4, 2, ' ', 0)
	fmt.Fprintln(tw, "scenario\tmeasure\tvalue\tunit")
	for _, r := range results {
		for _, v := range r.Values {
			fmt.Fprintf(tw, "%s\t%s\t%s\t%s\n", label(r), v.Name, formatValue(v.Value), v.Unit)
		}
	}
	tw.Flush()
	var failed []string
	for _, r := range results {
		for _, c := range r.Checks {
			if !c.Pass {
				failed = append(failed, fmt.Sprintf("%s: %s: %s", label(r), c.Name, c.Detail))
			}
		}
		ok = ok && r.OK
	}
	fmt.Fprintln(w)
	if len(failed) == 0 {
		fmt.Fprintf(w, "checks: all passed (%d scenario runs)\n", len(results))
	} else {
		fmt.Fprintf(w, "checks FAILED:\n  %s\n", strings.Join(failed, "\n  "))
	}
	return ok, nil
}

// label names a scenario run in the report, with its load.
func label(r result) string {
	if r.Label != "" {
		return r.Label
	}
	if n, ok := r.Params["sessions"]; ok {
		return fmt.Sprintf("%s@%v", r.Scenario, n)
	}
	return r.Scenario
}
