package benchkit

import (
	"os"
	"sync"
	"testing"
	"time"

	"go.uber.org/goleak"
)

func TestMain(m *testing.M) { goleak.VerifyTestMain(m) }

func ms(n int) time.Duration { return time.Duration(n) * time.Millisecond }

func TestPercentileNearestRank(t *testing.T) {
	one := []time.Duration{ms(7)}
	ten := make([]time.Duration, 10)
	hundred := make([]time.Duration, 100)
	for i := range ten {
		ten[i] = ms(i + 1) // 1..10
	}
	for i := range hundred {
		hundred[i] = ms(i + 1) // 1..100
	}
	cases := []struct {
		name   string
		sorted []time.Duration
		p      float64
		want   time.Duration
	}{
		{"empty", nil, 50, 0},
		{"single p0", one, 0, ms(7)},
		{"single p50", one, 50, ms(7)},
		{"single p100", one, 100, ms(7)},
		{"ten p50", ten, 50, ms(5)},
		{"ten p90", ten, 90, ms(9)},
		{"ten p99", ten, 99, ms(10)},
		{"ten p100", ten, 100, ms(10)},
		{"ten p0", ten, 0, ms(1)},
		{"ten p51", ten, 51, ms(6)},
		{"hundred p50", hundred, 50, ms(50)},
		{"hundred p90", hundred, 90, ms(90)},
		{"hundred p99", hundred, 99, ms(99)},
		{"hundred p99.5", hundred, 99.5, ms(100)},
	}
	for _, c := range cases {
		if got := Percentile(c.sorted, c.p); got != c.want {
			t.Errorf("%s: Percentile(p=%v) = %v, want %v", c.name, c.p, got, c.want)
		}
	}
}

func TestRecorderSummary(t *testing.T) {
	r := NewRecorder(0)
	if s := r.Summary(); s.N != 0 || s.P99 != 0 || s.String() != "n=0" {
		t.Fatalf("empty summary = %+v", s)
	}
	// Added out of order from several goroutines: the summary must sort.
	var wg sync.WaitGroup
	for g := range 4 {
		wg.Go(func() {
			for i := g; i < 1000; i += 4 {
				r.Add(ms(1000 - i))
			}
		})
	}
	wg.Wait()
	s := r.Summary()
	want := Summary{N: 1000, Min: ms(1), Max: ms(1000), P50: ms(500), P90: ms(900), P99: ms(990), Mean: 500500 * time.Microsecond}
	if s != want {
		t.Fatalf("summary = %+v\nwant      %+v", s, want)
	}
	j := s.JSON()
	if j["p99_ms"] != 990.0 || j["n"] != int64(1000) {
		t.Fatalf("JSON = %v", j)
	}
}

func TestRecorderBoundedKeepsExactExtremes(t *testing.T) {
	r := NewRecorder(100)
	for i := 1; i <= 100000; i++ {
		r.Add(time.Duration(i) * time.Microsecond)
	}
	if len(r.samples) != 100 {
		t.Fatalf("kept %d samples, want 100", len(r.samples))
	}
	s := r.Summary()
	if s.N != 100000 || s.Min != time.Microsecond || s.Max != 100000*time.Microsecond {
		t.Fatalf("exact fields wrong: %+v", s)
	}
	// A uniform reservoir of 100 from 1..100000 µs: its median is near 50 ms.
	if s.P50 < 30*time.Millisecond || s.P50 > 70*time.Millisecond {
		t.Fatalf("reservoir median %v is not near 50ms", s.P50)
	}
}

func TestMillis(t *testing.T) {
	for d, want := range map[time.Duration]string{
		250 * time.Microsecond:   "0.250ms",
		12345 * time.Microsecond: "12.35ms",
		1500 * time.Millisecond:  "1500ms",
	} {
		if got := Millis(d); got != want {
			t.Errorf("Millis(%v) = %q, want %q", d, got, want)
		}
	}
}

func TestProcSelf(t *testing.T) {
	rss, err := RSS(os.Getpid())
	if err != nil || rss <= 0 {
		t.Fatalf("RSS = %d, %v", rss, err)
	}
	if _, err := CPUTime(0); err != nil {
		t.Fatal(err)
	}
	if _, err := CPUTime(os.Getpid()); err != nil {
		t.Fatal(err)
	}
	if _, err := RSS(-1); err == nil {
		t.Fatal("RSS of a bad pid succeeded")
	}
}
